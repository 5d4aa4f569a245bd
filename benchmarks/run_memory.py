"""Peak memory and wall time of the loss head, against every peer, side by side.

    python benchmarks/run_memory.py            # the quick preset (the default): ~5 min on 2 CPU cores
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
import textwrap
import time
from collections.abc import Callable, Sequence
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
    # None until parsed: the report says whether the preset was asked for or is the default.
    parser.set_defaults(preset=None)
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]"
    )
    parser.add_argument(
        "--peers",
        default=",".join(FRONT_DOOR_PEERS),
        help=f"comma-separated subset of {','.join(PEERS)} (default: all but ours-all)",
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
    args.preset_flag = args.preset is not None
    args.preset = args.preset or "quick"
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu", args.preset]
    # The preset's sizes that the command line replaced (named in the report's header).
    args.overrides = [key for key in PRESETS["cpu", "quick"] if getattr(args, key) is not None]
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
# Reporting. Small pure functions, so that the tests can check the report's conventions (one
# ratio direction, no ratio on a noise-level figure, the preset in the header) without running
# a benchmark.

#: How every ratio of the report reads; said once, above the tables.
RATIO_CONVENTION = (
    "Every ratio is value / best of its row, for memory and time alike: 1.00x is the best, "
    "2.00x twice the best's figure. Lower is better."
)

#: The smallest memory figure the CPU report gives as a number. Below 256 pages, peak RSS holds
#: as much bookkeeping (the autograd graph, Python objects, glibc's small allocations under the
#: 128 KiB mmap threshold, which are not returned between runs) as tensors, and RSS cannot tell
#: them apart. For scale, on the 2-core CI machine after a warm-up: a 64 MiB step's peak moved by
#: 0.1 MiB between runs; a 4x4 autograd step read 0 B, but 5.3 MiB on its very first run.
NOISE_MIN_BYTES = MIB

#: The CUDA caching allocator counts bytes, rounded to 512-byte blocks.
CUDA_RESOLUTION_BYTES = 512

#: The default peers: every one but "ours-all" (every logit saved), which at the front door's
#: shapes is the default itself (all of their logits fit its budget); run_real_width.py uses it.
FRONT_DOOR_PEERS = tuple(p for p in PEERS if p != "ours-all")

# Peers that are solopo-kernels (drawn apart in the plots, reported in the summary).
OURS = ("ours", "ours-strict", "ours-all")


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


def format_ratio(ratio: float) -> str:
    """``1.28x``, ``39.4x``, ``3586x``: two significant decimals where they carry information."""
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


# Table metrics: how to read a figure off a result, how to print it, and whether the memory
# noise floor applies to it.
METRICS: dict[str, tuple[Any, Any, bool]] = {
    "peak": (lambda r: r.peak_bytes, _fmt_mem, True),
    # Never negative: the peak RSS can stay under the gradients' nominal bytes when some of
    # their pages are never touched. Such figures are under the noise floor anyway.
    "extra": (lambda r: max(r.peak_bytes - r.grad_bytes, 0), _fmt_mem, True),
    "time": (lambda r: r.median_s, _fmt_time, False),
}


def partial(peer: str, workload: Workload) -> bool:
    """Peers that compute less than the row asks (excluded from 'best', marked with †)."""
    return peer == "liger" and workload.kind == "solopo"


def peak_spread_bytes(results: dict[tuple[int, str], CellResult]) -> int:
    """The largest spread (max - min) of one cell's peak between its timed runs."""
    return max(
        (max(r.peaks_bytes) - min(r.peaks_bytes) for r in results.values() if r.peaks_bytes),
        default=0,
    )


def noise_floor_bytes(device: str, spread_bytes: int) -> int:
    """The memory figure under which the report prints "noise" instead of a number and a ratio:
    the measurement's resolution (:data:`NOISE_MIN_BYTES` of RSS on the CPU, 512-byte blocks on
    CUDA) or the spread it measured between repeated runs, whichever is larger."""
    resolution = CUDA_RESOLUTION_BYTES if device.startswith("cuda") else NOISE_MIN_BYTES
    return max(resolution, spread_bytes)


def format_figure(
    value: float,
    best: float | None,
    fmt: Callable[[float], str],
    *,
    floor: float | None = None,
    less_work: bool = False,
) -> str:
    """One table entry: the figure and its ratio ``value / best`` (the report's one convention).

    A figure under ``floor`` prints as ``< floor`` without a ratio, and a row whose ``best`` is
    under ``floor`` gets no ratios at all (they would divide by noise). ``less_work`` (a peer
    that computes less than the row) adds †; the row's best is bold.
    """
    if floor is not None and value < floor:
        return f"< {fmt(floor)} (noise)" + (" †" if less_work else "")
    if best is None or best <= 0 or (floor is not None and best < floor):
        text = fmt(value)
    else:
        text = f"{fmt(value)} ({format_ratio(value / best)})"
    if less_work:
        return text + " †"
    return f"**{text}**" if value == best else text


def table(
    cells: list[Workload],
    peers: list[str],
    results: dict[tuple[int, str], CellResult],
    metric: str,
    floor: float | None = None,
    head: bool = False,
) -> str:
    """Markdown table of one metric of :data:`METRICS`: rows = cells, columns = peers, each
    figure with its ratio to the best full-work peer of the row (:func:`format_figure`; the
    memory metrics with the noise ``floor``); other cells say why not. ``head``: the row labels
    name H and V too (a grid over head widths)."""
    read, fmt, noisy = METRICS[metric]
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
            row.append(
                format_figure(
                    values[p],
                    best,
                    fmt,
                    floor=floor if noisy else None,
                    less_work=partial(p, w),
                )
            )
        lines.append(f"| {w.label(head=head)} | " + " | ".join(row) + " |")
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


def preset_label(preset: str, flag_given: bool, overrides: Sequence[str] = ()) -> str:
    """The grid actually run: ``quick preset (the default)``, ``full preset (--full)``, plus the
    preset's sizes that the command line replaced."""
    text = f"{preset} preset ({f'--{preset}' if flag_given else 'the default'})"
    if overrides:
        flags = ["--" + key.removesuffix("_s").replace("_", "-") for key in overrides]
        text += " with " + ", ".join(flags) + " from the command line"
    return text


def header(args: argparse.Namespace) -> str:
    """The report's title line: device, shapes, loss and the preset actually run."""
    return (
        f"## Loss-head peak memory and time: {args.device}, {args.dtype}, H={args.hidden}, "
        f"V={args.vocab}, {args.pairs} pair(s) per batch, {args.loss_type}; "
        + preset_label(args.preset, args.preset_flag, args.overrides)
    )


def reading_notes(device: str, floor: int, spread: int) -> list[str]:
    """How to read the tables, said once above them: the ratio convention, the marks, and the
    memory noise floor with its definition."""
    if device.startswith("cuda"):
        source = (
            f"the larger of the allocator's {CUDA_RESOLUTION_BYTES}-byte blocks and the largest "
            "spread of one cell's peak between its timed runs in this run"
        )
    else:
        source = (
            f"the larger of {_fmt_mem(NOISE_MIN_BYTES)} (256 pages: below that, peak RSS holds "
            "as much bookkeeping, such as the autograd graph and small allocations, as tensors) "
            "and the largest spread of one cell's peak between its timed runs in this run"
        )
    return [
        f"**How to read the tables.** {RATIO_CONVENTION} Bold: the best of the row. "
        "†: the peer computes less than the row asks (see the last table); its ratio is to the "
        "best full-work peer, and it is never counted as the best.",
        "",
        f"**Noise floor of the memory figures: {_fmt_mem(floor)}**, {source} "
        f"({_fmt_mem(spread)}). A figure under it prints as `< {_fmt_mem(floor)} (noise)` "
        "without a ratio, and a row whose best figure is under it has no ratios.",
    ]


def summary(
    cells: list[Workload],
    peers: list[str],
    results: dict[tuple[int, str], CellResult],
    floor: float | None = None,
) -> list[str]:
    """At the largest cell of each kind, solopo-kernels' peak memory and time in the tables'
    convention (value / best of the row) and which peer is the best."""
    lines = []
    for kind in dict.fromkeys(w.kind for w in cells):
        index = max(
            (i for i, w in enumerate(cells) if w.kind == kind),
            key=lambda i: (cells[i].positions, cells[i].response_tokens),
        )
        w = cells[index]
        ok = {
            p: r for p in peers if (r := results.get((index, p))) is not None and r.status == "ok"
        }
        for name in (p for p in OURS if p in peers):
            ours = ok.get(name)
            if ours is None:
                r = results.get((index, name))
                lines.append(f"- {w.label()}: {PEERS[name].label} {r.status if r else 'not run'}")
                continue
            parts = []
            for what, metric in (("peak memory", "peak"), ("time", "time")):
                read, fmt, noisy = METRICS[metric]
                full = {p: read(r) for p, r in ok.items() if not partial(p, w)}
                best_peer = min(full, key=full.get)
                text = format_figure(
                    read(ours), full[best_peer], fmt, floor=floor if noisy else None
                ).strip("*")
                best = (
                    "the best"
                    if full[best_peer] == read(ours)
                    else f"the best: {PEERS[best_peer].label}, {fmt(full[best_peer])}"
                )
                # "55 MiB (1.00x)" -> "55 MiB (1.00x, the best)"
                text = text[:-1] + f", {best})" if text.endswith(")") else f"{text} ({best})"
                parts.append(f"{what} {text}")
            lines.append(
                f"- largest {kind} cell ({w.label()}), {PEERS[name].label}: " + "; ".join(parts)
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


# ---------------------------------------------------------------------------------------------
# Plots.

#: Marker of each group of cells that share a kind but not a response length (and so on).
GROUP_MARKERS = "osD^v"


def line_style(peer: str) -> dict[str, Any]:
    """solopo-kernels' lines solid and thick, on top; every peer's dashed and thin."""
    if peer in OURS:
        return {"linestyle": "-", "linewidth": 2.8, "zorder": 3, "markersize": 6}
    return {"linestyle": "--", "linewidth": 1.2, "zorder": 2, "markersize": 4}


def log_tick_label(value: float) -> str:
    """A minor tick's label on a log axis: ``20``, ``0.5``, ``5000`` at leading digits 2 and 5,
    nothing elsewhere."""
    text = f"{value:g}"
    return text if text.lstrip("0.")[:1] in ("2", "5") else ""


def plot_specs(cells: list[Workload]) -> list[tuple[str, str, str]]:
    """``(kind, metric, file name)`` of each plot: one per kind with two lengths or more, for
    peak memory and for time."""
    specs = []
    for kind in dict.fromkeys(w.kind for w in cells):
        if len({w.long_len for w in cells if w.kind == kind}) < 2:
            continue  # a curve needs two lengths
        for metric in ("peak", "time"):
            specs.append((kind, metric, f"{'memory' if metric == 'peak' else 'time'}_{kind}.png"))
    return specs


def legend_notes(cells: list[Workload], peers: list[str], grouped: bool) -> list[str]:
    """Legend lines that explain the plot's marks: the line styles, the markers of the
    response-length groups, and † for every peer so marked in ``cells`` (one kind)."""
    notes = ["solid, thick: solopo-kernels; dashed: peers"]
    if grouped:
        notes.append("markers: response length R")
    for p in peers:
        if any(partial(p, w) for w in cells):
            notes.append(f"† {PEERS[p].label} computes less: {PEERS[p].computes(cells[0])}")
    return notes


def plots(
    cells: list[Workload],
    peers: list[str],
    results: dict[tuple[int, str], CellResult],
    folder: Path,
) -> list[Path]:
    """Peak memory and time against the long-context length (:func:`plot_specs`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, metric, name in plot_specs(cells):
        indices = [i for i, w in enumerate(cells) if w.kind == kind]
        groups = list(
            dict.fromkeys(
                (cells[i].response_len, cells[i].short_len, cells[i].hidden, cells[i].vocab)
                for i in indices
            )
        )
        fig, ax = plt.subplots(figsize=(10, 4.8))
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
                    marker=GROUP_MARKERS[g_index % len(GROUP_MARKERS)],
                    color=f"C{p_index}",
                    label=label,
                    **line_style(p),
                )
        w = cells[indices[0]]
        set_length_axis(ax, sorted({cells[i].long_len for i in indices}))
        ax.set_yscale("log")
        # Plain numbers (20, 50, 100) on the log axis instead of 2 x 10^1; minor ticks labelled
        # at 2 and 5 only, so that the labels do not overlap.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: log_tick_label(value)))
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
            f"{kind}: {'peak memory' if metric == 'peak' else 'time'} ({shape}); lower is better",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        # Notes as entries without a line, so that every mark on the plot is explained there.
        for note in legend_notes([cells[i] for i in indices], peers, len(groups) > 1):
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(textwrap.fill(note, 44, subsequent_indent="  "))
        ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def set_length_axis(ax: Any, lengths: list[int]) -> None:
    """Log-2 x axis with the measured lengths as ticks, written 4K, 8K, ..."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()


# ---------------------------------------------------------------------------------------------
# What the run writes, and its progress.


def output_files(
    cells: list[Workload], out: Path, json_path: Path, plot_folder: Path | None
) -> list[tuple[Path, str]]:
    """Every file the run writes, with one line on what it shows."""
    files = [
        (out / "run_memory.md", "this report: the tables, the summary and the loss cross-check"),
        (json_path, "every raw figure (each timed run's time and peak), the settings, the machine"),
    ]
    if plot_folder is not None:
        for kind, metric, name in plot_specs(cells):
            what = "peak memory" if metric == "peak" else "forward+backward time"
            files.append(
                (plot_folder / name, f"{what} of the {kind} rows against the length, log-log")
            )
    return files


def files_section(files: list[tuple[Path, str]]) -> list[str]:
    """The report's closing list of files, paths relative to the working directory when inside it."""
    lines = ["Files written:"]
    for path, what in files:
        try:
            shown = path.resolve().relative_to(Path.cwd())
        except ValueError:
            shown = path
        lines.append(f"- `{shown}`: {what}")
    return lines


class Progress:
    """One progress bar on stderr, in two stages.

    First the start of each peer: its process, ``import torch``, its cell built and its untimed
    warm-up (``torch.compile`` for CCE and Liger), most of the first minute. Then the measured
    cells. The bar restarts between the two, so that its estimate counts measured cells only
    instead of extrapolating the start-up (which made the first estimate 44 minutes). A later
    warm-up (a new kind of cell) shows in the bar's text.
    """

    def __init__(self, cells: list[Workload], peers: list[str]) -> None:
        self.cells, self.peers = cells, peers
        self.started: set[str] = set()
        self.bar = tqdm(
            total=len(peers), desc="start + warm-up (untimed)", unit="peer", file=sys.stderr
        )

    def on_setup(self, index: int, peer: str, reply: dict[str, Any] | None) -> None:
        label = PEERS[peer].label
        if reply is None:
            doing = "starting" if peer not in self.started else "setting up"
            self.bar.set_postfix_str(f"{doing} {label} for {self.cells[index].label()}")
            return
        if peer not in self.started:
            self.started.add(peer)
            self.bar.update()
            if len(self.started) == len(self.peers):
                # Name and unit first, so that the restarted bar is the first thing drawn.
                self.bar.set_description("measuring", refresh=False)
                self.bar.unit = "cell"
                self.bar.reset(total=len(self.cells) * len(self.peers))
                self.bar.set_postfix_str(f"timed runs of {self.cells[index].label()}")
        elif reply.get("warmed_up"):
            self.bar.set_postfix_str(f"{label} warmed up for {self.cells[index].kind}")

    def on_result(self, index: int, peer: str, result: CellResult) -> None:
        self.bar.set_postfix_str(
            f"{self.cells[index].label()} | {PEERS[peer].label}: {result.status}", refresh=False
        )
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def failures_section(
    cells: list[Workload], results: dict[tuple[int, str], CellResult]
) -> list[str]:
    """The report's lines on the cells that did not run (status and reason), or none."""
    problems = [
        f"- {cells[i].label()} | {PEERS[p].label}: {r.status}: {r.reason}"
        for (i, p), r in sorted(results.items())
        if r.status != "ok"
    ]
    return ["", "Cells that did not run:", *problems] if problems else []


def measure(cells: list[Workload], args: argparse.Namespace) -> dict[tuple[int, str], CellResult]:
    """Every peer of ``args.peers`` on every cell, side by side (:func:`harness.run_grid`), with
    the progress bar; ``args`` carries the harness settings (device, threads, warm-up, repeats,
    time budget, memory limit, timeout). Shared with ``run_real_width.py``."""
    progress = Progress(cells, args.peers)
    try:
        return run_grid(
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
            on_result=progress.on_result,
            on_setup=progress.on_setup,
        )
    finally:
        progress.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cells = grid(args)
    if not cells:
        print("no cell: check --long, --short and --response", file=sys.stderr)
        return 2
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        f"{len(cells)} cells x {len(args.peers)} peers, "
        f"{preset_label(args.preset, args.preset_flag, args.overrides)}. First each peer's "
        "process starts and warms up (imports, torch.compile; untimed), then the cells are "
        "measured, the peers taking turns.",
        file=sys.stderr,
    )
    results = measure(cells, args)
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
    spread = peak_spread_bytes(results)
    floor = noise_floor_bytes(args.device, spread)
    files = output_files(cells, args.out, args.json, args.plot)
    report = [
        header(args),
        "",
        f"Machine: {machine}; {env['date']}. Peak memory: one forward+backward above its inputs "
        f"({'peak RSS, fresh mark per run' if args.device == 'cpu' else 'max_memory_allocated'}); time: median of up to "
        f"{args.repeats} runs after warm-up, peers interleaved. Ts, Tl: short and long context "
        "lengths, each row being a context followed by R response tokens (T, N for logprobs).",
        "",
        *reading_notes(args.device, floor, spread),
        "",
        "### Peak memory",
        "",
        table(cells, args.peers, results, "peak", floor),
        "",
        "### Extra memory: peak minus the gradients every peer returns (dW, dhidden)",
        "",
        table(cells, args.peers, results, "extra", floor),
        "",
        "### Time (forward + backward)",
        "",
        table(cells, args.peers, results, "time"),
        "",
        "### What each peer computes",
        "",
        legend(cells, args.peers),
        "",
        *summary(cells, args.peers, results, floor),
        "",
        loss_check(cells, args.peers, results),
    ]
    report += failures_section(cells, results)
    report += ["", f"Measured in {elapsed / 60:.1f} min.", "", *files_section(files)]
    text = "\n".join(report)
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.json.parent).mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        "noise_floor_bytes": floor,
        "peak_spread_bytes": spread,
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
    if args.plot is not None:
        plots(cells, args.peers, results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
