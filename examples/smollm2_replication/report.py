"""Aggregate the unit results into the committed summary JSON, a markdown report and a plot.

Accuracies are percentages of test questions answered correctly (greedy, sub-EM), the mean over
seeds with its standard error over questions (:mod:`.stats`). "long" pools the long lengths: each
question's mean over them. Comparisons are paired per question (:func:`.stats.paired`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from replication.grid import results_of
from replication.report import environment

from .config import VARIANTS, Preset
from .pipeline import Workspace, read_jsonl, write_json
from .stats import accuracy, paired
from .training import unit

LONG = "long"
#: (arm, against) pairs of the comparison table, by variant.
COMPARISONS = (
    ("solo", "short"),
    ("solo", "expand-long"),
    ("solo-long", "short"),
    ("solo-long", "expand-long"),
    ("solo-long", "solo"),
    ("expand-long", "short"),
    ("short", "base"),
    ("expand-long", "base"),
    ("solo", "base"),
    ("solo-long", "base"),
)


def arm_name(variant: str) -> str:
    return unit(variant, 0, "test").arm


def arm_order() -> list[str]:
    return ["base", *(arm_name(v) for v in VARIANTS)]


def _by_arm(preset: Preset, work: Workspace) -> dict[str, list[dict[str, Any]]]:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for result in results_of(work, "test", preset):
        by_arm.setdefault(result["unit"]["arm"], []).append(result)
    return {arm: sorted(rs, key=lambda r: r["unit"]["seed"]) for arm, rs in by_arm.items()}


def aggregate(preset: Preset, work: Workspace) -> dict[str, Any]:
    """Per arm: accuracy per column and pooled over the long lengths, cost, settings."""
    lengths = [str(n) for n in preset.test_lengths]
    columns = ["short", *lengths]
    arms: dict[str, Any] = {}
    correct: dict[str, dict[str, list[str]]] = {}
    by_arm = _by_arm(preset, work)
    _check_same_questions(by_arm, columns)
    for arm, results in by_arm.items():
        correct[arm] = {c: [r["correct"][c] for r in results] for c in columns}
        long_strings = ["".join(r["correct"][n] for n in lengths) for r in results]
        pooled = accuracy(long_strings)
        # the pooled standard error treats a question's lengths as one unit (they are not
        # independent): the per-question mean over lengths, then over questions
        pooled["se"] = paired_se(correct[arm], lengths)
        costs = [r["cost"] for r in results if r["cost"]]
        arms[arm] = {
            "seeds": [r["unit"]["seed"] for r in results],
            "hparams": results[0]["unit"]["hparams"],
            "accuracy": {c: accuracy(correct[arm][c]) for c in columns},
            LONG: pooled,
            "step_seconds": statistics.median(c["step_seconds_median"] for c in costs)
            if costs
            else None,
            # seeds can run on different machines (the grid goes on across sessions): a step
            # time compares with other arms' of the same seed, not with their medians
            "step_seconds_by_seed": [c["step_seconds_median"] for c in costs],
            "steps": costs[0]["steps"] if costs else None,
            "peak_rss_mib": max(c["peak_rss_above_start_mib"] or 0 for c in costs)
            if costs
            else None,
            "eval_seconds": statistics.fmean(r["eval_seconds"] for r in results),
        }
    ordered = {arm: arms[arm] for arm in arm_order() if arm in arms}
    return {"columns": columns, "lengths": lengths, "arms": ordered, "correct": correct}


def _check_same_questions(by_arm: dict[str, list[dict[str, Any]]], columns: list[str]) -> None:
    """Every test unit answered the same number of questions per column: the paired comparisons
    line answers up by position (a unit evaluated before ``test_eval_questions`` changed is
    stale: delete its result to redo it)."""
    counts = {
        f"{r['unit']['arm']} seed {r['unit']['seed']}": tuple(r["questions"][c] for c in columns)
        for results in by_arm.values()
        for r in results
    }
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"test units answered different numbers of questions per column {columns}: "
            f"{counts}; delete the stale units' results under units/test/ and rerun"
        )


def paired_se(correct: dict[str, list[str]], lengths: list[str]) -> float:
    """Standard error of an arm's pooled long accuracy, questions as the unit."""
    import numpy as np

    from .stats import per_question

    c = np.stack([per_question(correct[n]) for n in lengths], axis=1).mean(axis=1)
    return float(c.std(ddof=1) / np.sqrt(len(c))) if len(c) > 1 else 0.0


def comparisons(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pair of :data:`COMPARISONS` present: pooled over the long lengths, each length,
    and the short prompt."""
    rows = []
    correct, lengths = summary["correct"], summary["lengths"]
    for variant, against in COMPARISONS:
        first = arm_name(variant)
        second = "base" if against == "base" else arm_name(against)
        if first not in correct or second not in correct:
            continue
        row = {"arm": first, "against": second}
        row[LONG] = paired(correct[first], correct[second], lengths)
        for column in ("short", *lengths):
            row[column] = paired(correct[first], correct[second], [column])
        rows.append(row)
    return rows


def dev_sweep(preset: Preset, work: Workspace) -> list[dict[str, Any]]:
    rows = []
    for result in results_of(work, "dev", preset):
        acc = result["accuracy"]
        rows.append(
            {
                "arm": result["unit"]["arm"],
                "hparams": result["unit"]["hparams"],
                "accuracy": acc,
                "mean": statistics.fmean(acc.values()),
                "step_seconds": (result["cost"] or {}).get("step_seconds_median"),
            }
        )
    order = {arm: i for i, arm in enumerate(arm_order())}
    return sorted(rows, key=lambda r: (order.get(r["arm"], 99), json.dumps(r["hparams"])))


def _pct(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['se']:.1f}"


def _settings(arm: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(arm["hparams"].items()))


def _comparison_cell(stats: dict[str, Any]) -> str:
    low, high = stats["ci95"]
    return (
        f"{100 * stats['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] "
        f"p={stats['p_bootstrap']:.2g}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The results table, the paired comparisons, the dev sweep and the pairs' yield."""
    summary = report["summary"]
    columns, lengths = summary["columns"], summary["lengths"]
    preset = report["preset"]
    arms = summary["arms"]
    questions = next(iter(arms.values()))["accuracy"]["short"]["questions"] if arms else 0
    head = ["arm", *columns, "long (pooled)", "s / step by seed", "peak MiB", "settings"]
    lines = []
    if not report["run"].get("complete", True):
        counts = report["units_done"]
        lines += [
            f"**Partial results: the grid stopped with units left** ({counts['dev']} dev and "
            f"{counts['test']} test units finished). The settings of the test arms are chosen on "
            "dev only once the dev sweep is complete; rerun the same command to go on.",
            "",
        ]
    lines += [
        f"Test accuracy (%, greedy, sub-EM) of SmolLM2-135M-Instruct on {questions} one-hop "
        f"biography questions per column, mean over seeds {preset['seeds']} ± standard error over "
        f"questions; long contexts in tokens (trained at {preset['train_length']}). Cost: the "
        f"median wall time of an optimizer step ({preset['batch_size']} pairs, LoRA "
        f"r={preset['lora_rank']}{', bf16 autocast' if preset['bf16'] else ', float32'}) in each "
        "seed's run, in seed order (a seed's runs may share a machine that another seed's do not: "
        "compare arms within a seed), and peak resident memory above the start of training.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, arm in arms.items():
        cells = [_pct(arm["accuracy"][c]) for c in columns] + [_pct(arm[LONG])]
        step = " / ".join(f"{seconds:.1f}" for seconds in arm["step_seconds_by_seed"]) or "-"
        peak = f"{arm['peak_rss_mib']:.0f}" if arm["peak_rss_mib"] else "-"
        label = f"**{name}**" if name.startswith("SoLo") else name
        lines.append(f"| {label} | " + " | ".join([*cells, step, peak, _settings(arm)]) + " |")
    lines += [
        "",
        "Paired comparisons (percentage points, first arm minus second, seeds averaged per "
        "question; 95% bootstrap interval over questions and two-sided p; MDE: the smallest "
        "difference this design detects with 80% power; seeds: in how many seeds the first arm "
        "is ahead):",
        "",
        "| arm | against | long (pooled) | MDE | seeds | short | " + " | ".join(lengths) + " |",
        "|" + "---|" * (6 + len(lengths)),
    ]
    for row in report["comparisons"]:
        pooled = row[LONG]
        cells = [
            _comparison_cell(pooled),
            f"{100 * pooled['mde']:.1f}",
            f"{pooled['seeds_ahead']}/{pooled['seeds']}",
            *(_comparison_cell(row[c]) for c in ("short", *lengths)),
        ]
        lines.append(f"| {row['arm']} | {row['against']} | " + " | ".join(cells) + " |")
    dev_columns = ["short", *map(str, preset["dev_lengths"])]
    lines += [
        "",
        "Dev set (the choices; first seed; mean = the selection score):",
        "",
        "| arm | settings | " + " | ".join(dev_columns) + " | mean | s / step |",
        "|" + "---|" * (len(dev_columns) + 4),
    ]
    chosen = report["selection"]
    for row in report["dev_sweep"]:
        picked = row["arm"] in chosen and chosen[row["arm"]]["hparams"] == row["hparams"]
        settings = ", ".join(f"{k}={v:g}" for k, v in sorted(row["hparams"].items()))
        cells = [f"{100 * row['accuracy'][c]:.1f}" for c in dev_columns]
        step = f"{row['step_seconds']:.2f}" if row["step_seconds"] else "-"
        lines.append(
            f"| {row['arm']} | {settings}{' (chosen)' if picked else ''} | "
            + " | ".join(cells)
            + f" | {100 * row['mean']:.1f} | {step} |"
        )
    sampling = report["sampling"]
    if sampling is None:
        return "\n".join([*lines, "", "Pairs: not sampled yet."]) + "\n"
    lines += [
        "",
        f"Pairs: {sampling['pairs']} of {sampling['questions']} training questions "
        f"({100 * sampling['yield']:.0f}%) got a correct and an incorrect answer among "
        f"{sampling['samples_per_question']} samples (temperature {preset['temperature']}); "
        f"{sampling['no_correct']} had no correct one, {sampling['no_incorrect']} no incorrect "
        f"one; {100 * sampling['sample_accuracy']:.0f}% of the samples were correct; "
        f"{sampling['seconds'] / 60:.1f} min of sampling ({sampling['backend']}).",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against context length, one line per arm, standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    columns, lengths = summary["columns"], summary["lengths"]
    xs = [report["short_tokens"], *map(int, lengths)]
    colors = {
        "base": "black",
        arm_name("short"): "tab:gray",
        arm_name("expand-long"): "tab:orange",
        arm_name("solo"): "tab:green",
        arm_name("solo-long"): "tab:blue",
    }
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, arm in summary["arms"].items():
        means = [100 * arm["accuracy"][c]["mean"] for c in columns]
        errors = [100 * arm["accuracy"][c]["se"] for c in columns]
        axis.errorbar(
            xs,
            means,
            yerr=errors,
            label=name,
            color=colors.get(name),
            linestyle=":" if name == "base" else "-",
            marker="o",
            capsize=3,
        )
    axis.set_xscale("log", base=2)
    axis.set_xticks(xs)
    axis.set_xticklabels(["short", *lengths])
    axis.axvline(report["preset"]["train_length"], color="lightgray", linewidth=1)
    axis.set_xlabel("context length (tokens); gray line: training length")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("SmolLM2-135M-Instruct, SimPO arms (mean over seeds ± s.e. over questions)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    preset: Preset, work: Workspace, prepared: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """Write ``smollm2_replication.json``, ``.md`` and ``.png`` in the results folder (of the
    units finished so far: ``run["complete"]`` False labels them partial)."""
    rows = read_jsonl(work.contexts("test", preset.test_lengths[0]))
    summary = aggregate(preset, work)
    selection = work.results / "selection.json"
    report = {
        "preset": dataclasses.asdict(preset),
        "fingerprint": preset.fingerprint(),
        "short_tokens": round(statistics.fmean(r["metadata"]["short_length"] for r in rows)),
        **prepared,
        # written once the dev sweep of the learning rate is complete
        "selection": json.loads(selection.read_text()) if selection.exists() else {},
        "units_done": {split: len(results_of(work, split, preset)) for split in ("dev", "test")},
        "dev_sweep": dev_sweep(preset, work),
        "summary": {k: v for k, v in summary.items() if k != "correct"},
        "comparisons": comparisons(summary),
        "run": run,
        "environment": environment(),
    }
    write_json(work.results / "smollm2_replication.json", report)
    (work.results / "smollm2_replication.md").write_text(markdown(report), encoding="utf-8")
    if summary["arms"]:  # nothing to draw before the first test unit
        plot(report, work.results / "smollm2_replication.png")
    return report
