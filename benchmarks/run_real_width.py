"""The loss head at real model widths: the SoLoPO workload against every peer, one row per width.

    python benchmarks/run_real_width.py        # (H, V) = (1024, 32768), (2048, 49152), (4096, 128256)
    python benchmarks/run_real_width.py --widths 1024x32768x1024 --long 4096,16384

``run_memory.py`` measures the head at one small width (H=512, V=8192, where every logit of a step
fits the default saved-logits budget); this runs the same harness at the widths of real models,
where it does not. Workload: one SoLoPO step (a short chosen/rejected pair and the long chosen row,
SimPO + reward alignment; ``peers.py``, kind ``solopo``), ``R`` response tokens per row
(``N = 3 R``), forward + backward, float32, each peer in its own process (``harness.py``). The
response counts shrink with the width so that the largest row stays within minutes on two CPU
cores (one 6 N H V pass at H=4096, V=128256, N=1536 is 4.8 TFLOP).

Peers: TRL 1.16's chunked log-probs, Liger's fused linear SimPO (†: it has no long row), Cut
Cross-Entropy, and this package in three modes: the default (a 256 MiB saved-logits budget),
nothing saved (the strict kernels, 8 N H V) and every logit saved (6 N H V). The report gives
each figure with its ratio to the best peer of its row, then the goal: the default's time within
1.05x of the fastest other peer at no more than 0.6x that peer's peak memory, with the memory
model of each mode (``L = 4 N V`` bytes of float32 logits, ``Wg = 4 V H`` of weight gradient).

Writes ``real_width.md``, ``real_width.json`` and ``real_width.png`` (time and peak memory of each
mode relative to the fastest other peer, per width) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from harness import CellResult
from peers import PEERS, Workload
from run_memory import (
    OURS,
    _fmt_mem,
    available_memory_bytes,
    environment,
    failures_section,
    format_ratio,
    loss_check,
    measure,
    noise_floor_bytes,
    partial,
    peak_spread_bytes,
    reading_notes,
    table,
)

HERE = Path(__file__).resolve().parent
#: (H, V, R): the hidden size and vocabulary of a 1B-, 1.7B- and 8B-class model, and the response
#: tokens per row (three rows per step).
WIDTHS = ((1024, 32768, 1024), (2048, 49152, 1024), (4096, 128256, 512))
PEER_NAMES = ("trl", "liger", "cce", "ours", "ours-strict", "ours-all")
#: The goal for the default mode against the fastest peer that is not this package.
TIME_GOAL, MEMORY_GOAL = 1.05, 0.6


def parse_widths(text: str) -> list[tuple[int, int, int]]:
    """``"1024x32768x1024,2048x49152x1024"`` -> ``[(1024, 32768, 1024), ...]`` (H x V x R)."""
    widths = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"--widths: expected HxVxR items such as 1024x32768x1024, got {item!r}"
            )
        widths.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return widths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--widths",
        type=parse_widths,
        default=list(WIDTHS),
        help="comma-separated HxVxR rows (hidden, vocabulary, response tokens per row)",
    )
    parser.add_argument("--long", default="4096", help="long-context lengths Tl, comma-separated")
    parser.add_argument("--short", type=int, default=1024, help="short-context length Ts")
    parser.add_argument("--loss-type", default="simpo", choices=["dpo", "simpo", "orpo", "cpo"])
    parser.add_argument("--peers", default=",".join(PEER_NAMES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=30.0, dest="time_budget_s")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="CPU threads per peer"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per cell")
    parser.add_argument("--mem-limit-gb", type=float, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tmp" / "real-width")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.long = [int(v) for v in args.long.split(",")]
    args.peers = args.peers.split(",")
    for name in args.peers:
        if name not in PEERS:
            parser.error(f"--peers: unknown peer {name!r} (choose from {', '.join(PEERS)})")
    if args.mem_limit_gb is None and not args.device.startswith("cuda"):
        args.mem_limit_gb = round(0.9 * available_memory_bytes() / 2**30, 1)
    return args


def grid(args: argparse.Namespace) -> list[Workload]:
    """One ``solopo`` cell per width and long length."""
    return [
        Workload(
            "solopo", length, args.short, response, hidden, vocab, 1, args.loss_type, args.dtype
        )
        for hidden, vocab, response in args.widths
        for length in args.long
    ]


def fastest_other_peer(
    index: int, workload: Workload, peers: list[str], results: dict[tuple[int, str], CellResult]
) -> str | None:
    """The fastest peer of a row that computes the whole row and is not this package."""
    times = {
        p: r.median_s
        for p in peers
        if p not in OURS
        and not partial(p, workload)
        and (r := results.get((index, p))) is not None
        and r.status == "ok"
    }
    return min(times, key=times.get) if times else None


def goal_rows(
    cells: list[Workload], peers: list[str], results: dict[tuple[int, str], CellResult]
) -> list[dict[str, Any]]:
    """Per cell and mode of this package: time and peak memory over the fastest other peer's,
    and whether the mode meets the goal (time <= 1.05x at peak memory <= 0.6x)."""
    rows = []
    for index, w in enumerate(cells):
        best = fastest_other_peer(index, w, peers, results)
        for mode in (p for p in OURS if p in peers):
            r = results.get((index, mode))
            row: dict[str, Any] = {"cell": index, "workload": w.label(), "mode": mode, "peer": best}
            if best is not None and r is not None and r.status == "ok":
                ref = results[index, best]
                row["time_ratio"] = r.median_s / ref.median_s
                # A peak of 0 (RSS did not move: a tiny cell) gives no memory ratio, no verdict.
                if ref.peak_bytes:
                    row["memory_ratio"] = r.peak_bytes / ref.peak_bytes
                    row["meets_goal"] = (
                        row["time_ratio"] <= TIME_GOAL and row["memory_ratio"] <= MEMORY_GOAL
                    )
            rows.append(row)
    return rows


def memory_model(w: Workload) -> str:
    """The sizes that decide the modes' memory: float32 logits and weight gradient."""
    logits, weight_grad = 4 * w.response_tokens * w.vocab, 4 * w.vocab * w.hidden
    return (
        f"N={w.response_tokens}: L = 4NV = {_fmt_mem(logits)}, Wg = 4VH = {_fmt_mem(weight_grad)}"
    )


def goal_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | mode | fastest other peer | time ratio | peak-memory ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "meets_goal" not in row:
            peer = PEERS[row["peer"]].label if row.get("peer") else "n/a"
            time_ratio = format_ratio(row["time_ratio"]) if "time_ratio" in row else ""
            lines.append(
                f"| {row['workload']} | {PEERS[row['mode']].label} | {peer} | {time_ratio} | n/a | |"
            )
            continue
        verdict = "meets" if row["meets_goal"] else "misses"
        lines.append(
            f"| {row['workload']} | {PEERS[row['mode']].label} | {PEERS[row['peer']].label} | "
            f"{format_ratio(row['time_ratio'])} | {format_ratio(row['memory_ratio'])} | {verdict} |"
        )
    return "\n".join(lines)


def plot(cells: list[Workload], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(modes))
    for k, mode in enumerate(modes):
        mine = [r for r in rows if r["mode"] == mode]
        xs = [r["cell"] + k * width for r in mine]
        for ax, key in zip(axes, ("time_ratio", "memory_ratio")):
            ax.bar(xs, [r.get(key) or 0.0 for r in mine], width, label=PEERS[mode].label)
    labels = [f"H={w.hidden}\nV={w.vocab}\nTl={w.long_len}" for w in cells]
    for ax, title, goal in zip(
        axes, ("time / fastest other peer", "peak memory / that peer's"), (TIME_GOAL, MEMORY_GOAL)
    ):
        ax.axhline(goal, color="black", linestyle="--", linewidth=1, label=f"goal {goal}x")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], labels, fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cells = grid(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = measure(cells, args)
    elapsed = time.perf_counter() - started
    env = environment(args.device, args.threads) | {"load_average_1min_at_start": load_before}
    spread = peak_spread_bytes(results)
    floor = noise_floor_bytes(args.device, spread)
    rows = goal_rows(cells, args.peers, results)
    report = [
        f"## The loss head at real widths: {args.device}, {args.dtype}, SoLoPO ({args.loss_type} "
        f"+ reward alignment), one pair (short chosen, short rejected, long chosen), Ts={args.short}",
        "",
        f"Machine: {env['device_name']}, {env['threads']} threads of {env['cpu_cores']} cores, "
        f"{(env['ram_bytes'] or 0) / 2**30:.0f} GiB RAM; torch {env['versions']['torch']}; load "
        f"average {load_before:.1f} at start, {env['load_average_1min']:.1f} at end; {env['date']}. "
        f"Command: `{env['command']}`. Peak memory: one forward+backward above its inputs (peak "
        f"RSS, fresh mark per run); time: median of up to {args.repeats} runs after warm-up, peers "
        "interleaved, each in its own process.",
        "",
        *reading_notes(args.device, floor, spread),
        "",
        "Sizes: " + "; ".join(f"H={w.hidden}, V={w.vocab}, {memory_model(w)}" for w in cells) + ".",
        "",
        "### Peak memory",
        "",
        table(cells, args.peers, results, "peak", floor, head=True),
        "",
        "### Extra memory: peak minus the gradients every peer returns (dW, dhidden)",
        "",
        table(cells, args.peers, results, "extra", floor, head=True),
        "",
        "### Time (forward + backward)",
        "",
        table(cells, args.peers, results, "time", head=True),
        "",
        f"### The goal: time <= {TIME_GOAL}x the fastest other peer's at peak memory <= "
        f"{MEMORY_GOAL}x its",
        "",
        goal_table(rows),
        "",
        loss_check(cells, args.peers, results),
    ]
    report += failures_section(cells, results)
    report += ["", f"Measured in {elapsed / 60:.1f} min."]
    text = "\n".join(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_width.md").write_text(text + "\n")
    payload = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        "goal": {"time_ratio_at_most": TIME_GOAL, "memory_ratio_at_most": MEMORY_GOAL},
        "goal_rows": rows,
        "cells": [
            {"workload": cells[i].as_dict(), "peer": p, "partial": partial(p, cells[i])}
            | r.as_dict()
            for (i, p), r in sorted(results.items())
        ],
    }
    (args.out / "real_width.json").write_text(json.dumps(payload, indent=1))
    if not args.no_plot:
        plot(cells, rows, args.out / "real_width.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
