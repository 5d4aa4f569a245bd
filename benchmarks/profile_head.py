"""Where the torch backend's time goes: each saved-logits mode against its GEMMs and FLOP model.

    python benchmarks/profile_head.py                       # N=3072, H=1024, V=32768, float32
    python benchmarks/profile_head.py --shape 1536x4096x128256 --repeats 3

For one ``(N, H, V)`` call of ``fused_linear_logprobs``'s torch backend (``ops/torch_tiles.py``)
it times, in one process and interleaved (so that a drift of the machine hits every mode alike):

* the forward and the backward of three modes: nothing saved (the strict kernels, ``8 N H V``
  FLOPs), the default budget (256 MiB), and every logit saved (``6 N H V``);
* the bare GEMMs those FLOPs stand for: one ``(N, H) x (H, V)`` product (``2 N H V``) cut into the
  backend's own tiles;

then reports each mode's time against its FLOP model at the all-saved mode's rate (``modelled =
all-saved time x FLOPs / 6 N H V``: what the mode would take if its extra GEMMs ran as fast as
the all-saved head's) and the top operators of one strict backward (``torch.profiler``). Answers:
does the strict head cost 8/6 of the all-saved head, as its FLOPs say, or more, and where does the
rest go.

Writes ``profile_head.md`` and ``profile_head.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_SHAPE = (3072, 1024, 32768)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--shape: expected NxHxV, e.g. 3072x1024x32768, got {text!r}"
        )
    n, h, v = (int(p) for p in parts)
    return n, h, v


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=parse_shape, default=DEFAULT_SHAPE, help="NxHxV")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tmp" / "profile-head")
    return parser.parse_args(argv)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    from solopo_kernels.ops import torch_tiles
    from solopo_kernels.ops.tiles import KernelOptions

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, h, v = args.shape
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(n, h, generator=generator) * 0.5
    weight = torch.randn(v, h, generator=generator) * 0.02
    targets = torch.randint(0, v, (n,), generator=generator)
    grad = torch.randn(n, generator=generator)
    cpu = torch.device("cpu")
    modes = {
        "strict (nothing saved)": KernelOptions(saved_logits_bytes=0),
        "default (256 MiB)": KernelOptions(),
        "every logit saved": KernelOptions(saved_logits_bytes=4 * n * v),
    }
    tiles = {
        name: torch_tiles.default_tiles(n, h, v, cpu, None, options)
        for name, options in modes.items()
    }
    strict_tiles = tiles["strict (nothing saved)"]

    def run(name: str) -> tuple[float, float]:
        t = tiles[name]
        state: dict[str, Any] = {}

        def forward() -> None:
            state["out"] = torch_tiles.forward(
                rows, weight, None, targets, temperature=1.0, tiles=t, save_logits=True
            )

        def backward() -> None:
            _, lse, saved = state.pop("out")
            torch_tiles.backward(
                grad, rows, weight, None, targets, lse, temperature=1.0, tiles=t,
                needs_grad=(True, True, False), saved=saved,
            )  # fmt: skip

        return timed(forward), timed(backward)

    def gemm() -> float:
        """One 2 N H V product in the strict backend's tiles (vocabulary outer, tokens inner)."""
        out = torch.empty(strict_tiles.token_tile, strict_tiles.vocab_tile)
        start = time.perf_counter()
        for v0 in range(0, v, strict_tiles.vocab_tile):
            w = weight[v0 : v0 + strict_tiles.vocab_tile]
            for t0 in range(0, n, strict_tiles.token_tile):
                r = rows[t0 : t0 + strict_tiles.token_tile]
                torch.mm(r, w.t(), out=out[: r.shape[0], : w.shape[0]])
        return time.perf_counter() - start

    load_start = os.getloadavg()[0]
    for name in modes:  # warm-up: page in the weight, grow the allocator
        run(name)
    gemm()
    times: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "backward": []} for name in modes
    }
    gemm_times = []
    for _ in range(args.repeats):
        gemm_times.append(gemm())
        for name in modes:
            forward_s, backward_s = run(name)
            times[name]["forward"].append(forward_s)
            times[name]["backward"].append(backward_s)

    from torch.profiler import ProfilerActivity, profile

    _, lse, _ = torch_tiles.forward(
        rows, weight, None, targets, temperature=1.0, tiles=strict_tiles, save_logits=False
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch_tiles.backward(
            grad, rows, weight, None, targets, lse, temperature=1.0, tiles=strict_tiles,
            needs_grad=(True, True, False), saved=None,
        )  # fmt: skip
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    load_end = os.getloadavg()[0]

    gemm_s = statistics.median(gemm_times)
    flops_2nhv = 2 * n * h * v
    saved_share = {
        name: min(1.0, tiles[name].saved_columns / v) if name != "strict (nothing saved)" else 0.0
        for name in modes
    }
    all_saved_total = statistics.median(
        f + b
        for f, b in zip(
            times["every logit saved"]["forward"], times["every logit saved"]["backward"]
        )
    )
    summary = {}
    for name in modes:
        forward_s = statistics.median(times[name]["forward"])
        backward_s = statistics.median(times[name]["backward"])
        units = 4 - saved_share[name]  # 2 N H V units: forward 1, backward 3 minus the saved share
        summary[name] = {
            "forward_s": forward_s,
            "backward_s": backward_s,
            "total_s": forward_s + backward_s,
            "saved_share": saved_share[name],
            "flops": units * flops_2nhv,
            "modelled_s": all_saved_total * units / 3,
        }
    strict_total = summary["strict (nothing saved)"]["total_s"]
    all_total = summary["every logit saved"]["total_s"]
    lines = [
        f"## Torch backend profile: N={n}, H={h}, V={v}, float32",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_start:.1f} "
        f"at start, {load_end:.1f} at end; median of {args.repeats} interleaved rounds. Command: "
        f"`python benchmarks/profile_head.py --shape {n}x{h}x{v} --repeats {args.repeats}`.",
        "",
        f"One bare 2NHV GEMM in the strict tiles ({strict_tiles.token_tile} x {strict_tiles.vocab_tile}): "
        f"{gemm_s:.2f} s ({flops_2nhv / gemm_s / 1e9:.0f} GFLOP/s); the all-saved head runs its 6 NHV "
        f"at {3 * flops_2nhv / all_saved_total / 1e9:.0f} GFLOP/s.",
        "",
        "| mode | saved share | forward | backward | total | FLOPs | model (all-saved rate) | total / model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['saved_share']:.0%} | {s['forward_s']:.2f} s | {s['backward_s']:.2f} s | "
            f"{s['total_s']:.2f} s | {s['flops'] / (n * h * v):.2f} NHV | {s['modelled_s']:.2f} s | "
            f"{s['total_s'] / s['modelled_s']:.2f}x |"
        )
    lines += [
        "",
        f"Strict / every logit saved: **{strict_total / all_total:.2f}x** (FLOPs: 8/6 = 1.33x).",
        "",
        "Top operators of one strict backward (self CPU time):",
        "",
        "```",
        top,
        "```",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_head.md").write_text(text + "\n")
    payload = {
        "shape": {"N": n, "H": h, "V": v},
        "threads": torch.get_num_threads(),
        "load_average": [load_start, load_end],
        "gemm_2nhv_s": gemm_times,
        "times": times,
        "summary": summary,
        "strict_over_all_saved": strict_total / all_total,
    }
    (args.out / "profile_head.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
