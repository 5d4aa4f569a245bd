"""Aggregate the unit results into the committed JSON, a markdown table and a plot.

Accuracies are percentages of test questions answered correctly (greedy, sub-EM), mean and
standard deviation over seeds (the sample standard deviation; 0 with one seed). "long avg" is
each seed's mean over the long lengths, then mean and std over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from .config import LOSS_TYPES, VARIANTS, Preset
from .grid import results_of
from .pipeline import Workspace, eval_contexts, write_json
from .training import Unit


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def arm_order() -> list[str]:
    """Table order: the starting model, then X, X expand-long, SoLo-X for each X."""
    order = ["base"]
    for loss_type in LOSS_TYPES:
        order += [Unit(loss_type, variant, 0, "test").arm for variant in VARIANTS]
    return order


def aggregate(preset: Preset, work: Workspace) -> dict[str, Any]:
    """Per arm: accuracy (mean/std over seeds) per column, long average, cost, settings."""
    columns = ["short", *map(str, preset.eval_lengths)]
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for result in results_of(work, "test", preset):
        by_arm.setdefault(result["unit"]["arm"], []).append(result)
    arms: dict[str, Any] = {}
    for arm in arm_order():
        results = sorted(by_arm.get(arm, []), key=lambda r: r["unit"]["seed"])
        if not results:
            continue
        accuracy = {
            column: _mean_std([100 * r["accuracy"][column] for r in results]) for column in columns
        }
        long_avg = [100 * statistics.fmean(r["accuracy"][c] for c in columns[1:]) for r in results]
        costs = [r["cost"] for r in results if r["cost"]]
        arms[arm] = {
            "seeds": [r["unit"]["seed"] for r in results],
            "hparams": results[0]["unit"]["hparams"],
            "learning_rate": results[0]["training"]["learning_rate"],
            "alpha": results[0]["unit"]["alpha"],
            "accuracy": accuracy,
            "long_avg": _mean_std(long_avg),
            "per_seed": {
                str(r["unit"]["seed"]): {c: r["accuracy"][c] for c in columns} for r in results
            },
            "step_seconds": _mean_std([c["step_seconds_median"] for c in costs]) if costs else None,
            "peak_rss_mib": (
                _mean_std([c["peak_rss_above_start_mib"] for c in costs])
                if costs and all(c["peak_rss_above_start_mib"] is not None for c in costs)
                else None
            ),
        }
    return {"columns": columns, "arms": arms, "questions": _questions(preset, work)}


def _questions(preset: Preset, work: Workspace) -> int | None:
    results = results_of(work, "test", preset)
    return results[0]["questions"] if results else None


def comparisons(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """SoLo-X and SoLo-X RA-long against X and X expand-long, and RA-long against SoLo-X:
    per-seed paired differences (percentage points) of the short accuracy and of the long
    average, mean and std over the seeds."""
    rows = []
    columns = summary["columns"]
    arms = summary["arms"]
    for loss_type in LOSS_TYPES:
        solo, solo_long, short, expand = (
            Unit(loss_type, v, 0, "test").arm for v in ("solo", "solo-long", "short", "expand-long")
        )
        pairs = [
            (solo, short),
            (solo, expand),
            (solo_long, short),
            (solo_long, expand),
            (solo_long, solo),
        ]
        for arm, other in pairs:
            if arm not in arms or other not in arms:
                continue
            seeds = sorted(set(arms[arm]["per_seed"]) & set(arms[other]["per_seed"]))
            row: dict[str, Any] = {"arm": arm, "against": other, "seeds": len(seeds)}
            for label, pick in (
                ("short", lambda acc: acc["short"]),
                ("long_avg", lambda acc: statistics.fmean(acc[c] for c in columns[1:])),
            ):
                deltas = [
                    100 * (pick(arms[arm]["per_seed"][s]) - pick(arms[other]["per_seed"][s]))
                    for s in seeds
                ]
                row[label] = {**_mean_std(deltas), "positive": sum(d > 0 for d in deltas)}
            rows.append(row)
    return rows


def dev_sweep(preset: Preset, work: Workspace) -> list[dict[str, Any]]:
    """Every dev result: arm, setting, accuracy per column and the mean used for the choice."""
    rows = []
    for result in results_of(work, "dev", preset):
        accuracy = result["accuracy"]
        rows.append(
            {
                "arm": result["unit"]["arm"],
                "hparams": result["unit"]["hparams"],
                "accuracy": accuracy,
                "mean": statistics.fmean(accuracy.values()),
            }
        )
    order = {arm: index for index, arm in enumerate(arm_order())}
    return sorted(rows, key=lambda row: (order.get(row["arm"], 99), str(row["hparams"])))


def _cell(stats: dict[str, float], digits: int = 1) -> str:
    mean, std = f"{stats['mean']:.{digits}f}", f"{stats['std']:.{digits}f}"
    return f"{mean} ± {std}" if stats["n"] > 1 else mean


def _settings(arm: dict[str, Any]) -> str:
    """beta (gamma), learning rate and alpha of an arm; empty for the starting model."""
    if not arm["hparams"]:
        return ""
    parts = [f"{k}={v:g}" for k, v in sorted(arm["hparams"].items()) if k not in ("lr", "alpha")]
    parts.append(f"lr={arm['learning_rate']:g}")
    return ", ".join(parts + ([f"alpha={arm['alpha']:g}"] if arm["alpha"] else []))


def markdown(report: dict[str, Any]) -> str:
    """The results table (shaped like the paper's: one row per arm, grouped by loss), the paired
    comparisons, the dev sweep and the starting model's fine-tuning curve."""
    summary = report["summary"]
    columns = summary["columns"]
    head = ["arm", "short", *(f"{c}" for c in columns[1:]), "long avg", "s / step", "peak MiB"]
    lines = [
        f"Test accuracy (%, greedy, sub-EM) on {summary['questions']} questions, mean ± std over "
        f"seeds {report['preset']['seeds']}; long contexts in tokens. Cost: median wall time "
        "of an optimizer step and peak resident memory above the start of training, one CPU "
        "thread.",
        "",
        "| " + " | ".join(head) + " | settings |",
        "|" + "---|" * (len(head) + 1),
    ]
    for name, arm in summary["arms"].items():
        cells = [_cell(arm["accuracy"][c]) for c in columns] + [_cell(arm["long_avg"])]
        step = _cell(arm["step_seconds"], 2) if arm["step_seconds"] else "-"
        peak = _cell(arm["peak_rss_mib"], 0) if arm["peak_rss_mib"] else "-"
        label = f"**{name}**" if name.startswith("SoLo") else name
        lines.append(f"| {label} | " + " | ".join([*cells, step, peak, _settings(arm)]) + " |")
    lines += [
        "",
        'SoLo-X (RA-long: `ra_gradient="long"`) against its baselines: paired differences per '
        "seed (percentage points), mean ± std; in brackets, the seeds where the first arm is "
        "ahead.",
        "",
        "| | against | short | long avg |",
        "|---|---|---|---|",
    ]
    for row in report["comparisons"]:
        cells = [
            f"{row[k]['mean']:+.1f} ± {row[k]['std']:.1f} ({row[k]['positive']}/{row['seeds']})"
            for k in ("short", "long_avg")
        ]
        lines.append(f"| {row['arm']} | {row['against']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Dev set (the choice of the settings; first seed; mean = the selection score):",
        "",
    ]
    dev_columns = columns
    lines.append("| arm | settings | " + " | ".join(dev_columns) + " | mean |")
    lines.append("|" + "---|" * (len(dev_columns) + 3))
    chosen = report["selection"]
    for row in report["dev_sweep"]:
        settings = ", ".join(f"{k}={v:g}" for k, v in sorted(row["hparams"].items()))
        picked = row["arm"] in chosen and chosen[row["arm"]]["hparams"] == row["hparams"]
        cells = [f"{100 * row['accuracy'][c]:.1f}" for c in dev_columns]
        mark = " (chosen)" if picked else ""
        lines.append(
            f"| {row['arm']} | {settings}{mark} | "
            + " | ".join(cells)
            + f" | {100 * row['mean']:.1f} |"
        )
    return "\n".join([*lines, "", *_fine_tuning_curve(report["starting_model"])]) + "\n"


def _fine_tuning_curve(record: dict[str, Any]) -> list[str]:
    """The starting model's dev checks during fine-tuning, as table lines."""
    gate = record["gate"]
    lengths = [key for key in record["checks"][0]["dev_accuracy"] if key != "short"]
    lines = [
        f"Fine-tuning of the starting model (dev, the first {record['config']['check_questions']} "
        f"questions, greedy; gate: short >= {100 * gate['short']:.0f}% and "
        f"{gate['length']} tokens >= {100 * gate['long']:.0f}%, "
        f"{'met' if gate['met'] else 'not met'} at step {record['steps']}):",
        "",
        "| step | batches | short | " + " | ".join(lengths) + " |",
        "|" + "---|" * (len(lengths) + 3),
    ]
    for check in record["checks"]:
        accuracy = check["dev_accuracy"]
        cells = [f"{100 * accuracy[key]:.0f}" for key in ("short", *lengths)]
        phase = "mixed" if check["mixed"] else "short"
        lines.append(f"| {check['step']} | {phase} | " + " | ".join(cells) + " |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against context length, one line per arm, one panel per preference loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    columns = summary["columns"]
    lengths = [report["short_tokens"], *map(int, columns[1:])]
    figure, axes = plt.subplots(1, len(LOSS_TYPES), figsize=(13, 4.2), sharey=True)
    colors = {
        "short": "tab:gray",
        "expand-long": "tab:orange",
        "solo": "tab:green",
        "solo-long": "tab:blue",
    }
    for axis, loss_type in zip(axes, LOSS_TYPES, strict=True):
        arms = [("base", "black", ":")]
        arms += [
            (Unit(loss_type, variant, 0, "test").arm, colors[variant], "-") for variant in VARIANTS
        ]
        for name, color, line in arms:
            if name not in summary["arms"]:
                continue
            arm = summary["arms"][name]
            means = [arm["accuracy"][c]["mean"] for c in columns]
            stds = [arm["accuracy"][c]["std"] for c in columns]
            axis.errorbar(
                lengths,
                means,
                yerr=stds,
                label=name,
                color=color,
                linestyle=line,
                marker="o",
                capsize=3,
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths)
        axis.set_xticklabels(["short", *columns[1:]])
        axis.axvline(max(report["preset"]["train_lengths"]), color="lightgray", linewidth=1)
        axis.set_title(loss_type.upper().replace("SIMPO", "SimPO"))
        axis.set_xlabel("context length (tokens); gray line: longest training length")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    figure.suptitle(
        f"Short-to-long transfer on procedural multi-hop QA (tiny Llama, "
        f"{summary['questions']} test questions, mean ± std over seeds)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded with the results."""
    import torch
    import transformers
    import trl

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_report(
    preset: Preset, work: Workspace, prepared: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """Write ``replication.json``, ``replication.md`` and ``replication.png`` in the results."""
    rows = next(iter(eval_contexts(preset, work, "test").values()))
    short_tokens = round(statistics.fmean(r["metadata"]["short_length"] for r in rows))
    selection_path = work.results / "selection.json"
    report = {
        "preset": dataclasses.asdict(preset),
        "fingerprint": preset.fingerprint(),
        "short_tokens": short_tokens,
        **prepared,
        "selection": json.loads(selection_path.read_text()),
        "dev_sweep": dev_sweep(preset, work),
        "summary": (summary := aggregate(preset, work)),
        "comparisons": comparisons(summary),
        "run": run,
        "environment": environment(),
    }
    write_json(work.results / "replication.json", report)
    (work.results / "replication.md").write_text(markdown(report), encoding="utf-8")
    plot(report, work.results / "replication.png")
    return report
