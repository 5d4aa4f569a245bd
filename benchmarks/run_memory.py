"""Peak memory and wall time of the loss head, against every peer, side by side.

    python benchmarks/run_memory.py            # --quick: a few minutes on a 2-core CPU
    python benchmarks/run_memory.py --full     # the larger grid (tens of minutes on a CPU)
    python benchmarks/run_memory.py --kinds logprobs --long 16384 --response 4096 \\
        --hidden 1024 --vocab 32768 --peers plain,ours     # one cell of your choice

For each workload of the grid (see ``peers.py``: ``solopo`` = short pair + long chosen row with the
full SoLoPO loss; ``dpo-long`` = long-context DPO on a long pair; ``logprobs`` = per-token
log-probs of one sequence) and each peer (plain PyTorch with full logits, HF ``logits_to_keep``,
TRL 1.16 ``ChunkedLogProbFunction``, Liger-Kernel's fused preference losses, Apple Cut
Cross-Entropy, solopo-kernels), it measures the peak memory of one forward+backward of the loss
head above its inputs and the median wall time (``harness.py`` says how, and why it is honest).

Outputs (under ``--out``, default ``benchmarks/results/tmp/``): a markdown table on stdout and in
``run_memory.md`` (each figure with its ratio to the best peer of its row), ``run_memory.json``
with every raw figure and the environment, and PNG plots of peak memory and time against the
long-context length (log scale).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from harness import CellResult, run_grid
from peers import KINDS, LOSS_TYPES, PEERS, Workload
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
MIB = 1 << 20

# Grids. CPU shapes are scaled down from real models so that --quick fits in a few minutes on two
# shared cores (one full-logits forward+backward at T=16K, H=1024, V=32768 takes 30-80 s there,
# and the default grid runs that much work ~10 times); the GPU shapes are Llama-3-8B's head.
# "long" is the long-context length Tl (T for logprobs).
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("cpu", "quick"): {
        "kinds": ["solopo", "dpo-long"],
        "long": [4096, 8192, 16384],
        "short": 1024,
        "response": [256],
        "hidden": 512,
        "vocab": 8192,
        "dtype": "float32",
        "repeats": 3,
        "time_budget_s": 3.0,
    },
    ("cpu", "full"): {
        "kinds": ["solopo", "dpo-long"],
        "long": [2048, 4096, 8192, 16384],
        "short": 1024,
        "response": [256, 1024],
        "hidden": 1024,
        "vocab": 32768,
        "dtype": "float32",
        "repeats": 3,
        "time_budget_s": 30.0,
    },
    ("cuda", "quick"): {
        "kinds": ["solopo", "dpo-long"],
        "long": [4096, 8192, 16384, 32768],
        "short": 1024,
        "response": [512],
        "hidden": 4096,
        "vocab": 128256,
        "dtype": "bfloat16",
        "repeats": 10,
        "time_budget_s": 5.0,
    },
    ("cuda", "full"): {
        "kinds": ["solopo", "dpo-long"],
        "long": [4096, 8192, 16384, 32768],
        "short": 2048,
        "response": [256, 2048],
        "hidden": 4096,
        "vocab": 128256,
        "dtype": "bfloat16",
        "repeats": 20,
        "time_budget_s": 10.0,
    },
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_const", dest="preset", const="quick", help="small grid (default)"
    )
    size.add_argument(
        "--full", action="store_const", dest="preset", const="full", help="larger grid"
    )
    parser.set_defaults(preset="quick")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]"
    )
    parser.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}"
    )
    parser.add_argument("--kinds", help=f"comma-separated workload kinds: {','.join(KINDS)}")
    parser.add_argument(
        "--long", help="comma-separated long-context lengths Tl (T, all positions, for logprobs)"
    )
    parser.add_argument("--short", type=int, help="short-context length Ts (solopo)")
    parser.add_argument(
        "--response", help="comma-separated response lengths R, after the context (N for logprobs)"
    )
    parser.add_argument("--hidden", type=int, help="H")
    parser.add_argument("--vocab", type=int, help="V")
    parser.add_argument(
        "--pairs", type=int, default=1, help="preference pairs per batch (default 1)"
    )
    parser.add_argument(
        "--loss-type", default="dpo", choices=LOSS_TYPES, help="preference loss (default dpo)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="input dtype")
    parser.add_argument("--repeats", type=int, help="timed runs per cell (median reported)")
    parser.add_argument(
        "--time-budget",
        type=float,
        dest="time_budget_s",
        help="seconds of timed runs per peer and cell",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per peer and static shape (default 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="CPU threads per peer"
    )
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        help="memory limit of each peer process (CPU; default 90%% of available RAM)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before a silent peer counts as hung"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tmp", help="results folder")
    parser.add_argument("--json", type=Path, help="JSON path (default OUT/run_memory.json)")
    parser.add_argument("--plot", type=Path, help="folder for the PNG plots (default OUT)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plots")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu", args.preset]
    for key in ("kinds", "long", "response"):
        value = getattr(args, key)
        setattr(
            args,
            key,
            preset[key]
            if value is None
            else [v if key == "kinds" else int(v) for v in value.split(",")],
        )
    for key in ("short", "hidden", "vocab", "dtype", "repeats", "time_budget_s"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.peers = args.peers.split(",")
    for name in args.peers:
        if name not in PEERS:
            parser.error(f"--peers: unknown peer {name!r} (choose from {', '.join(PEERS)})")
    for kind in args.kinds:
        if kind not in KINDS:
            parser.error(f"--kinds: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if args.mem_limit_gb is None and not args.device.startswith("cuda"):
        args.mem_limit_gb = round(0.9 * available_memory_bytes() / 2**30, 1)
    args.json = args.json or args.out / "run_memory.json"
    args.plot = None if args.no_plot else (args.plot or args.out)
    return args


def grid(args: argparse.Namespace) -> list[Workload]:
    """The cells, grouped by kind and response length, each group from short to long."""
    cells = []
    for kind in args.kinds:
        for response in args.response:
            for length in args.long:
                if kind == "logprobs" and response > length:
                    continue  # N response tokens within T positions
                cells.append(
                    Workload(
                        kind,
                        length,
                        args.short,
                        response,
                        args.hidden,
                        args.vocab,
                        args.pairs,
                        args.loss_type,
                        args.dtype,
                    )
                )
    return cells


# ---------------------------------------------------------------------------------------------
# Environment.


PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "trl",
    "liger-kernel",
    "cut-cross-entropy",
    "solopo-kernels",
    "matplotlib",
)


def meminfo_bytes(key: str) -> int | None:
    """A field of /proc/meminfo (Linux), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int:
    return meminfo_bytes("MemAvailable") or 16 << 30


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def environment(device: str, threads: int) -> dict[str, Any]:
    """What produced the figures: machine, versions, threads, date, commit, command line."""
    git = ["git", "-C", str(HERE.parent)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        # Uncommitted changes to the code that produced the figures, if any.
        status = [*git, "status", "--porcelain", "--", "benchmarks/*.py", "solopo_kernels"]
        dirty = subprocess.run(
            status, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        commit = head.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, []
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda")
        else cpu_model(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": threads,
        "ram_bytes": meminfo_bytes("MemTotal"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "git_commit": commit,
        "git_uncommitted": [line.strip() for line in dirty],
        # Other processes share a CPU: the 1-minute load average when the report is written.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "command": " ".join([f"python benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
    }


# ---------------------------------------------------------------------------------------------
# Reporting.


def _fmt_mem(value: float) -> str:
    mib = value / MIB
    return (
        f"{mib / 1024:.2f} GiB"
        if mib >= 1024
        else f"{mib:.0f} MiB"
        if mib >= 10
        else f"{mib:.1f} MiB"
    )


def _fmt_time(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


# Table metrics: how to read a figure off a result, and how to print it.
METRICS: dict[str, tuple[Any, Any]] = {
    "peak": (lambda r: r.peak_bytes, _fmt_mem),
    # At least one page, so that ratios stay finite when a head adds nothing beyond its gradients.
    "extra": (lambda r: max(r.peak_bytes - r.grad_bytes, 4096), _fmt_mem),
    "time": (lambda r: r.median_s, _fmt_time),
}


def partial(peer: str, workload: Workload) -> bool:
    """Peers that compute less than the row asks (excluded from 'best', marked with †)."""
    return peer == "liger" and workload.kind == "solopo"


def table(
    cells: list[Workload], peers: list[str], results: dict[tuple[int, str], CellResult], metric: str
) -> str:
    """Markdown table of one metric of :data:`METRICS`: rows = cells, columns = peers, each
    figure with its ratio to the best full-work peer of the row; other cells say why not."""
    read, fmt = METRICS[metric]
    lines = [
        "| workload | " + " | ".join(PEERS[p].label for p in peers) + " |",
        "|" + "---|" * (len(peers) + 1),
    ]
    for index, w in enumerate(cells):
        values = {
            p: read(r)
            for p in peers
            if (r := results.get((index, p))) is not None and r.status == "ok"
        }
        full = [v for p, v in values.items() if not partial(p, w)]
        best = min(full) if full else None
        row = []
        for p in peers:
            if p not in values:
                r = results.get((index, p))
                row.append("n/a" if r is None else r.status)
                continue
            text = fmt(values[p]) + (f" ({values[p] / best:.2f}x)" if best else "")
            if partial(p, w):
                text += " †"
            elif values[p] == best:
                text = f"**{text}**"
            row.append(text)
        lines.append(f"| {w.label(head=False)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def legend(cells: list[Workload], peers: list[str]) -> str:
    """What each peer computes in each kind of row."""
    kinds = list(dict.fromkeys(w.kind for w in cells))
    examples = {w.kind: w for w in cells}
    lines = ["| peer | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for p in peers:
        lines.append(
            f"| {PEERS[p].label} | "
            + " | ".join(PEERS[p].computes(examples[k]) for k in kinds)
            + " |"
        )
    return "\n".join(lines)


def summary(
    cells: list[Workload], peers: list[str], results: dict[tuple[int, str], CellResult]
) -> list[str]:
    """Plain-language checks of the memory and time budgets (docs/kernels.md) at the largest cell of each kind."""
    lines = []
    if "ours" not in peers:
        return lines
    for kind in dict.fromkeys(w.kind for w in cells):
        index = max(
            (i for i, w in enumerate(cells) if w.kind == kind),
            key=lambda i: (cells[i].positions, cells[i].response_tokens),
        )
        w, ours = cells[index], results.get((index, "ours"))
        if ours is None or ours.status != "ok":
            lines.append(f"- {w.label()}: solopo-kernels {ours.status if ours else 'not run'}")
            continue
        parts = []
        for p in peers:
            r = results.get((index, p))
            if p == "ours" or r is None or r.status != "ok":
                continue
            tag = " (less work: †)" if partial(p, w) else ""
            peak, time_ = r.peak_bytes / ours.peak_bytes, r.median_s / ours.median_s
            parts.append(f"{PEERS[p].label}{tag}: peak memory {peak:.1f}x, time {time_:.2f}x")
        lines.append(
            f"- largest {kind} cell ({w.label()}): peer / solopo-kernels = " + "; ".join(parts)
        )
    return lines


def loss_check(
    cells: list[Workload], peers: list[str], results: dict[tuple[int, str], CellResult]
) -> str:
    """Whether every full-work peer's loss matches solopo-kernels' (they compute the same number)."""
    worst, where = 0.0, ""
    for index, w in enumerate(cells):
        ours = results.get((index, "ours"))
        if ours is None or ours.status != "ok":
            continue
        for p in peers:
            r = results.get((index, p))
            if p == "ours" or partial(p, w) or r is None or r.status != "ok":
                continue
            diff = abs(r.loss - ours.loss) / max(abs(ours.loss), 1e-6)
            if diff > worst:
                worst, where = diff, f" ({PEERS[p].label}, {w.label(head=False)})"
    return f"Loss cross-check: the largest relative difference to solopo-kernels' loss is {worst:.1e}{where}."


def set_length_axis(ax: Any, lengths: list[int]) -> None:
    """Log-2 x axis with the measured lengths as ticks, written 4K, 8K, ..."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()


def plots(
    cells: list[Workload],
    peers: list[str],
    results: dict[tuple[int, str], CellResult],
    folder: Path,
) -> list[Path]:
    """Peak memory and time against the long-context length, one PNG per kind and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    styles = ["-", "--", ":", "-."]
    for kind in dict.fromkeys(w.kind for w in cells):
        indices = [i for i, w in enumerate(cells) if w.kind == kind]
        if len({cells[i].long_len for i in indices}) < 2:
            continue  # a curve needs two lengths
        groups = list(
            dict.fromkeys(
                (cells[i].response_len, cells[i].short_len, cells[i].hidden, cells[i].vocab)
                for i in indices
            )
        )
        for metric in ("peak", "time"):
            fig, ax = plt.subplots(figsize=(9, 4.5))
            for p_index, p in enumerate(peers):
                for g_index, group in enumerate(groups):
                    xs, ys = [], []
                    for i in indices:
                        w, r = cells[i], results.get((i, p))
                        if (
                            (w.response_len, w.short_len, w.hidden, w.vocab) != group
                            or r is None
                            or r.status != "ok"
                        ):
                            continue
                        xs.append(w.long_len)
                        ys.append(r.peak_bytes / MIB if metric == "peak" else r.median_s)
                    if not xs:
                        continue
                    label = PEERS[p].label + (" †" if partial(p, cells[indices[0]]) else "")
                    if len(groups) > 1:
                        label += f" (R={group[0]})"
                    ax.plot(
                        xs,
                        ys,
                        styles[g_index % len(styles)],
                        marker="o",
                        color=f"C{p_index}",
                        label=label,
                    )
            w = cells[indices[0]]
            set_length_axis(ax, sorted({cells[i].long_len for i in indices}))
            ax.set_yscale("log")
            ax.set_xlabel(
                "long-context length Tl (tokens)"
                if kind != "logprobs"
                else "sequence length T (tokens)"
            )
            ax.set_ylabel(
                "peak loss-head memory (MiB)" if metric == "peak" else "forward+backward time (s)"
            )
            shape = f"H={w.hidden}, V={w.vocab}, {w.dtype}" + (
                f", Ts={w.short_len}" if kind == "solopo" else ""
            )
            if len(groups) == 1:
                shape += f", R={w.response_len}"
            ax.set_title(
                f"{kind}: {'peak memory' if metric == 'peak' else 'time'} ({shape})", fontsize=10
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
            fig.tight_layout()
            path = folder / f"{'memory' if metric == 'peak' else 'time'}_{kind}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cells = grid(args)
    if not cells:
        print("no cell: check --long, --short and --response", file=sys.stderr)
        return 2
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bar = tqdm(total=len(cells) * len(args.peers), desc="loss heads", unit="cell", file=sys.stderr)

    def progress(index: int, peer: str, result: CellResult) -> None:
        bar.set_postfix_str(f"{cells[index].label()} | {peer}: {result.status}", refresh=False)
        bar.update()

    results = run_grid(
        "peers",
        args.peers,
        [w.as_dict() for w in cells],
        device=args.device,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        time_budget_s=args.time_budget_s,
        mem_limit_bytes=int(args.mem_limit_gb * 2**30) if args.mem_limit_gb else None,
        timeout_s=args.timeout,
        on_result=progress,
    )
    bar.close()
    elapsed = time.perf_counter() - started

    env = environment(args.device, args.threads) | {"load_average_1min_at_start": load_before}
    machine = (
        f"{env['device_name']}, {env['threads']} threads of {env['cpu_cores']} cores, "
        f"{(env['ram_bytes'] or 0) / 2**30:.0f} GiB RAM; torch {env['versions']['torch']}"
    )
    if load_before is not None:
        machine += (
            f"; load average {load_before:.1f} at start, {env['load_average_1min']:.1f} at end"
        )
    report = [
        f"## Loss-head peak memory and time: {args.device}, {args.dtype}, H={args.hidden}, V={args.vocab}, "
        f"{args.pairs} pair(s) per batch, {args.loss_type} (--{args.preset})",
        "",
        f"Machine: {machine}; {env['date']}. Peak memory: one forward+backward above its inputs "
        f"({'peak RSS, fresh mark per run' if args.device == 'cpu' else 'max_memory_allocated'}); time: median of up to "
        f"{args.repeats} runs after warm-up, peers interleaved. Ratios: to the best peer of the row; "
        "† = computes less than the row (not counted as best). Ts, Tl: short and long context "
        "lengths, each row being a context followed by R response tokens (T, N for logprobs).",
        "",
        "### Peak memory",
        "",
        table(cells, args.peers, results, "peak"),
        "",
        "### Extra memory: peak minus the gradients every peer returns (dW, dhidden)",
        "",
        "Figures of a few MiB and below are within the page-level noise of RSS.",
        "",
        table(cells, args.peers, results, "extra"),
        "",
        "### Time (forward + backward)",
        "",
        table(cells, args.peers, results, "time"),
        "",
        "### What each peer computes",
        "",
        legend(cells, args.peers),
        "",
        *summary(cells, args.peers, results),
        "",
        loss_check(cells, args.peers, results),
    ]
    problems = [
        f"- {cells[i].label()} | {PEERS[p].label}: {r.status}: {r.reason}"
        for (i, p), r in sorted(results.items())
        if r.status != "ok"
    ]
    if problems:
        report += ["", "Cells that did not run:", *problems]
    report += ["", f"Measured in {elapsed / 60:.1f} min."]
    text = "\n".join(report)
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.json.parent).mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        "cells": [
            {
                "workload": cells[i].as_dict(),
                "peer": p,
                "computes": PEERS[p].computes(cells[i]),
                "partial": partial(p, cells[i]),
            }
            | r.as_dict()
            for (i, p), r in sorted(results.items())
        ],
    }
    args.json.write_text(json.dumps(payload, indent=1))
    (args.out / "run_memory.md").write_text(text + "\n")
    written = [args.json, args.out / "run_memory.md"]
    if args.plot is not None:
        written += plots(cells, args.peers, results, args.plot)
    print("\nWrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
