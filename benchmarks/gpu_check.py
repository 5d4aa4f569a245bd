"""One-command check of the Triton backend: correctness at real shapes, speed against peers.

On a CUDA machine (defaults: H=4096, V=128256, N in {2048, 8192} response tokens, bf16):

    python benchmarks/gpu_check.py

1. Correctness: per-token log-probs and the gradients of ``sum(g * logp)`` w.r.t. the rows and the
   weight, ours (``backend="triton"``) against an independent float32 chunked reference
   (materialised float32 logits, a token chunk at a time, IEEE float32 GEMMs). Pass: values
   <= 1e-4 and gradients <= 2e-2 relative (max |err| / max |ref|).
2. Timing of forward+backward on the same gathered rows ``(N, H)``, with CUDA events, median of
   ``--iters`` runs after ``--warmup`` excluded runs, and the extra peak memory of one step, for:
   ours (triton and torch backends), TRL's ``ChunkedLogProbFunction``, Cut Cross-Entropy
   ``linear_cross_entropy(reduction="none")`` (its default gradient filter, and exact), Liger's
   fused linear cross-entropy with ``reduction="none"``, and plain materialised logits. A peer
   that does not import is reported as "unavailable", one that fails as "error: ...".
3. Throughput: achieved TFLOP/s counting ``8 N H V`` FLOPs per forward+backward (docs/kernels.md), next
   to the bf16 matmul rate measured in the same run (``torch.mm`` of ``(N, H) x (H, 32768)``);
   ``ratio = time / (8 N H V / matmul rate)``, target <= 1.3 for ours on H100/H200.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` and exits 1 if a correctness check
fails. Without a GPU, ``python benchmarks/gpu_check.py --device cpu --interpret`` runs the same
pipeline end to end at a tiny shape under the Triton interpreter (timings then mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check"
VALUE_TOL, GRAD_TOL = 1e-4, 2e-2
TARGET_RATIO = 1.3
MATMUL_COLUMNS = 32768


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--interpret", action="store_true", help="run Triton kernels in the interpreter (CPU)"
    )
    parser.add_argument("--hidden", type=int, help="H (default 4096 on CUDA, 64 on the CPU)")
    parser.add_argument("--vocab", type=int, help="V (default 128256 on CUDA, 1000 on the CPU)")
    parser.add_argument(
        "--tokens", type=int, nargs="+", help="N values (default 2048 8192 on CUDA, 40 on the CPU)"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument(
        "--warmup", type=int, help="excluded runs per method (default 3 on CUDA, 1 on the CPU)"
    )
    parser.add_argument(
        "--iters", type=int, help="timed runs per method (default 20 on CUDA, 3 on the CPU)"
    )
    parser.add_argument("--peers", nargs="+", help="methods to time (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.interpret:
        parser.error("the Triton backend runs on the CPU only in the interpreter: add --interpret")
    cuda = args.device == "cuda"
    args.hidden = args.hidden or (4096 if cuda else 64)
    args.vocab = args.vocab or (128256 if cuda else 1000)
    args.tokens = args.tokens or ([2048, 8192] if cuda else [40])
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 3)
    return args


def methods(torch: Any) -> dict[str, Any]:
    """Name -> ``fn(rows, weight, targets) -> (N,) log-probs`` (differentiable), or the reason it
    is unavailable (a string). Imports happen here, after TRITON_INTERPRET is set."""
    from solopo_kernels.ops.logprobs import response_logprobs

    table: dict[str, Any] = {
        "solopo-triton": lambda r, w, t: response_logprobs(r, w, t, backend="triton"),
        "solopo-torch": lambda r, w, t: response_logprobs(r, w, t, backend="torch"),
        "plain-logits": lambda r, w, t: (
            torch.log_softmax((r @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
        ),
    }
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        try:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as trl_chunk
        except ImportError:
            trl_chunk = 32768
        table["trl-chunked-logprob"] = lambda r, w, t: ChunkedLogProbFunction.apply(
            r, w, None, t, 1.0, trl_chunk, None, 1.0, ()
        )[0]
    except ImportError as error:
        table["trl-chunked-logprob"] = f"unavailable: {error}"
    try:
        from cut_cross_entropy import linear_cross_entropy

        table["cce"] = lambda r, w, t: -linear_cross_entropy(r, w, t, reduction="none")
        table["cce-exact"] = lambda r, w, t: (
            -linear_cross_entropy(r, w, t, reduction="none", filter_eps=None)
        )
    except ImportError as error:
        table["cce"] = table["cce-exact"] = f"unavailable: {error}"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        table["liger-flce"] = lambda r, w, t: (
            -liger_fused_linear_cross_entropy(r, w, t, reduction="none")
        )
    except ImportError as error:
        table["liger-flce"] = f"unavailable: {error}"
    return table


def reference_fp32(torch: Any, rows, weight, targets, upstream, chunk: int = 1024):
    """float32 log-probs and gradients of ``sum(upstream * logp)``, a token chunk at a time."""
    rows32, weight32 = rows.float(), weight.float()
    n = rows.shape[0]
    logp = torch.empty(n, device=rows.device)
    grad_rows = torch.empty_like(rows32)
    grad_weight = torch.zeros_like(weight32)
    for t0 in range(0, n, chunk):
        t1 = min(t0 + chunk, n)
        log_probs = torch.log_softmax(rows32[t0:t1] @ weight32.t(), -1)
        picked = targets[t0:t1, None]
        logp[t0:t1] = log_probs.gather(1, picked).squeeze(1)
        g = upstream[t0:t1, None]
        dlogits = log_probs.exp_().mul_(-g).scatter_add_(1, picked, g)
        grad_rows[t0:t1] = dlogits @ weight32
        grad_weight.addmm_(dlogits.t(), rows32[t0:t1])
    return logp, grad_rows, grad_weight


def relative_error(actual, expected) -> float:
    scale = expected.double().abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / (scale or 1.0)


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere; milliseconds."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = (
                self.torch.cuda.Event(enable_timing=True),
                self.torch.cuda.Event(enable_timing=True),
            )
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def matmul_tflops(
    torch: Any, timer: Timer, n: int, hidden: int, dtype, device, warmup: int, iters: int
) -> float:
    a = torch.randn(n, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, MATMUL_COLUMNS, dtype=dtype, device=device)
    for _ in range(warmup):
        a @ b
    ms = statistics.median(timer(lambda: a @ b) for _ in range(iters))
    return 2 * n * hidden * MATMUL_COLUMNS / (ms * 1e-3) / 1e12


def run_method(
    torch: Any, fn, timer: Timer, rows, weight, targets, upstream, ref_logp, args
) -> dict[str, Any]:
    def step():
        rows.grad = weight.grad = None
        torch.autograd.backward(fn(rows, weight, targets), upstream)

    with torch.no_grad():
        logp_error = relative_error(fn(rows, weight, targets), ref_logp)
    for _ in range(args.warmup):
        step()
    memory = None  # extra peak of one step over the inputs, the gradients included
    if rows.is_cuda:
        torch.cuda.synchronize()
        rows.grad = weight.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        memory = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = sorted(timer(step) for _ in range(args.iters))
    with torch.no_grad():
        forward_ms = statistics.median(
            timer(lambda: fn(rows, weight, targets)) for _ in range(args.iters)
        )
    return {
        "status": "ok",
        "median_ms": statistics.median(times),
        "forward_ms": forward_ms,
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1))],
        "peak_extra_mib": memory,
        "logp_rel_err_vs_fp32": logp_error,
    }


def check_shape(torch: Any, n: int, args, device, dtype, table, timer: Timer) -> dict[str, Any]:
    from solopo_kernels.ops import triton_tiles

    hidden, vocab = args.hidden, args.vocab
    torch.manual_seed(0)
    # Logits with a spread like a trained head's (std ~4), targets anywhere incl. the last id.
    rows = torch.randn(n, hidden, device=device).to(dtype).requires_grad_()
    weight = (
        (torch.randn(vocab, hidden, device=device) * 4 / math.sqrt(hidden))
        .to(dtype)
        .requires_grad_()
    )
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[-1] = vocab - 1
    upstream = torch.randn(n, device=device)

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    ref_logp, ref_grad_rows, ref_grad_weight = reference_fp32(
        torch, rows.detach(), weight.detach(), targets, upstream
    )
    torch.set_float32_matmul_precision(previous)

    launches = triton_tiles.launch_counts["forward"]
    logp = table["solopo-triton"](rows, weight, targets)
    grad_rows, grad_weight = torch.autograd.grad(logp, [rows, weight], upstream)
    errors = {
        "logp": relative_error(logp, ref_logp),
        "grad_rows": relative_error(grad_rows, ref_grad_rows),
        "grad_weight": relative_error(grad_weight, ref_grad_weight),
    }
    correctness = {
        "rel_err": errors,
        "triton_ran": triton_tiles.launch_counts["forward"] > launches,
        "pass": errors["logp"] <= VALUE_TOL
        and max(errors["grad_rows"], errors["grad_weight"]) <= GRAD_TOL,
    }
    correctness["pass"] = correctness["pass"] and correctness["triton_ran"]
    del logp, grad_rows, grad_weight, ref_grad_rows, ref_grad_weight

    results: dict[str, Any] = {}
    matmul = matmul_tflops(torch, timer, n, hidden, dtype, device, args.warmup, args.iters)
    bound_ms = 8 * n * hidden * vocab / (matmul * 1e12) * 1e3
    for name in args.peers or list(table):
        fn = table.get(name, "unavailable: unknown method")
        if isinstance(fn, str):
            results[name] = {"status": fn}
            continue
        try:
            result = run_method(torch, fn, timer, rows, weight, targets, upstream, ref_logp, args)
        except Exception as error:  # a peer failing must not stop the check
            message = (str(error).splitlines() or [""])[0][:200].replace("|", "/")
            results[name] = {"status": f"error: {type(error).__name__}: {message}"}
            traceback.print_exc(file=sys.stderr)
        else:
            result["tflops"] = 8 * n * hidden * vocab / (result["median_ms"] * 1e-3) / 1e12
            result["ratio_to_matmul_bound"] = result["median_ms"] / bound_ms
            results[name] = result
        rows.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"N={n} {name}: {results[name]}", flush=True)
    tiles = triton_tiles.default_tiles(n, hidden, vocab, device, None)
    chosen = {
        kernel: str(
            getattr(
                getattr(triton_tiles, f"_{kernel}_launcher"), "best_config", "fixed (interpreter)"
            )
        )
        for kernel in ("forward", "dlogits")
    }
    return {
        "N": n,
        "H": hidden,
        "V": vocab,
        "dtype": str(dtype).removeprefix("torch."),
        "flops_8NHV": 8 * n * hidden * vocab,
        "matmul_tflops": matmul,
        "matmul_bound_ms": bound_ms,
        "correctness": correctness,
        "solopo_triton_tiles": {**dataclasses.asdict(tiles), "configs": chosen},
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# solopo-kernels GPU check",
        "",
        f"{report['device_name']}; torch {report['torch']}, triton {report['triton']}; "
        f"{report['timestamp']}. Forward+backward of per-token log-probs on gathered rows; "
        f"median of {report['args']['iters']} runs after {report['args']['warmup']} warm-up runs. "
        f"`ratio` = time / (8NHV / measured bf16 matmul rate); target for ours <= {TARGET_RATIO}.",
    ]
    if report["interpret"]:
        lines += ["", "**Triton interpreter on the CPU: a smoke run; timings are meaningless.**"]
    for shape in report["shapes"]:
        c = shape["correctness"]
        errs = ", ".join(f"{k} {v:.2e}" for k, v in c["rel_err"].items())
        lines += [
            "",
            f"## N={shape['N']}, H={shape['H']}, V={shape['V']}, {shape['dtype']}",
            "",
            f"Correctness of solopo-triton vs float32 chunked reference: **{'PASS' if c['pass'] else 'FAIL'}** "
            f"({errs}; limits {VALUE_TOL:g} / {GRAD_TOL:g}; Triton kernels ran: {c['triton_ran']}). "
            f"{shape['dtype']} matmul rate {shape['matmul_tflops']:.3g} TFLOP/s, 8NHV bound "
            f"{shape['matmul_bound_ms']:.3g} ms. Ours: {shape['solopo_triton_tiles']}.",
            "",
            "| method | status | fwd+bwd ms (median) | p20-p80 ms | fwd ms | TFLOP/s (8NHV) | ratio | extra peak MiB | logp rel err |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in shape["results"].items():
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']} | | | | | | | |")
                continue
            memory = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
            lines.append(
                f"| {name} | ok | {r['median_ms']:.2f} | {r['p20_ms']:.2f}-{r['p80_ms']:.2f} | "
                f"{r['forward_ms']:.2f} | {r['tflops']:.3g} | {r['ratio_to_matmul_bound']:.2f} | {memory} | "
                f"{r['logp_rel_err_vs_fp32']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch
    import triton

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA device: run with --device cpu --interpret for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, args.dtype)
    table = methods(torch)
    timer = Timer(torch, device)
    shapes = [check_shape(torch, n, args, device, dtype, table, timer) for n in args.tokens]
    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpret": args.interpret,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_ratio": TARGET_RATIO,
        "shapes": shapes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if all(s["correctness"]["pass"] for s in shapes) else 1


if __name__ == "__main__":
    sys.exit(main())
