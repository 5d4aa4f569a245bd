"""One-command check of the Triton backends: correctness at real shapes, speed against peers.

On a CUDA machine, from the repository root, with no install (``benchmarks/gpu_check.sh`` also
installs the carried peer wheels and bounds the time):

    python benchmarks/gpu_check.py

Default shapes (``N x H x V``, bf16): 2048x4096x128256 and 8192x4096x128256 (Llama-3-8B's head),
and 8192x4096x131072, the shape of the bar to beat (Liger's CuTe SM90 fused linear cross-entropy:
forward+backward in 50.4 ms on an H100, 698 TFLOP/s counted as 8NHV).

1. Correctness of each of our Triton methods (``solopo-triton``, ``solopo-triton-tma``,
   ``solopo-triton-saved``): per-token log-probs and the gradients of ``sum(g * logp)`` w.r.t.
   the rows and the weight, against an independent float32 chunked reference (materialised
   float32 logits, a token chunk at a time, IEEE float32 GEMMs). Pass: values <= 1e-4 and
   gradients <= 2e-2 relative (max |err| / max |ref|), and the Triton kernels really ran.
2. Timing of forward+backward on the same gathered rows ``(N, H)``, with CUDA events: median of
   the runs that fit in ``--time-budget`` seconds (at least 3, at most ``--iters``) after
   ``--warmup`` excluded runs (compilation and autotuning happen there), and the extra peak memory
   of one step, for: ours (``solopo-triton``: the default pointer kernels; ``-tma``: the
   persistent TMA variant; ``-saved``: the default kernels keeping all ``N x V`` float32 logits,
   6NHV FLOPs; ``solopo-torch``), TRL's ``ChunkedLogProbFunction``, Cut Cross-Entropy
   ``linear_cross_entropy(reduction="none")`` (default gradient filter, and exact), Liger's fused
   linear cross-entropy with ``reduction="none"``, and plain materialised logits. A peer that
   does not import (any exception) is "unavailable: ...", one that fails is "error: ...".
3. Throughput: TFLOP/s counting ``8 N H V`` FLOPs per forward+backward, next to the bf16 matmul
   rate measured in the same run (``torch.mm`` of ``(N, H) x (H, 32768)``);
   ``ratio = time / (8 N H V / matmul rate)``. The gradient floor (``dW`` and ``dhidden``, which
   every method returns) is reported next to each method's extra peak memory.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` after every method (a run cut
short keeps what it measured), and exits 1 if a correctness check fails or raised. Without a GPU,
``python benchmarks/gpu_check.py --device cpu --interpret`` runs the same pipeline end to end at a
tiny shape under the Triton interpreter (timings then mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package from this checkout: no install needed

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"
VALUE_TOL, GRAD_TOL = 1e-4, 2e-2
MATMUL_COLUMNS = 32768
# TRL 1.16's vocabulary chunk for ChunkedLogProbFunction (trl.trainer.utils
# _CHUNKED_LOGPROB_CHUNK_SIZE); read from there it would import datasets, pandas and pyarrow.
TRL_CHUNK = 32768
OURS_TRITON = ("solopo-triton", "solopo-triton-tma", "solopo-triton-saved")
PEER_PACKAGES = ("torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--interpret", action="store_true", help="run Triton kernels in the interpreter (CPU)"
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        help="NxHxV shapes (default on CUDA: 2048x4096x128256 8192x4096x128256 8192x4096x131072)",
    )
    parser.add_argument("--hidden", type=int, help="H for --tokens (default 64 on the CPU)")
    parser.add_argument("--vocab", type=int, help="V for --tokens (default 1000 on the CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", help="N values at --hidden, --vocab")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument(
        "--warmup", type=int, help="excluded runs per method (default 3 on CUDA, 1 on the CPU)"
    )
    parser.add_argument("--iters", type=int, help="most timed runs per method (default 20)")
    parser.add_argument(
        "--time-budget", type=float, default=2.0, help="seconds of timed runs per method"
    )
    parser.add_argument("--peers", nargs="+", help="methods to time (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.interpret:
        parser.error("the Triton backend runs on the CPU only in the interpreter: add --interpret")
    cuda = args.device == "cuda"
    if args.shapes:
        args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    elif args.tokens or args.hidden or args.vocab or not cuda:
        hidden, vocab = (
            args.hidden or (4096 if cuda else 64),
            args.vocab or (128256 if cuda else 1000),
        )
        args.shapes = [(n, hidden, vocab) for n in args.tokens or ([2048, 8192] if cuda else [40])]
    else:
        args.shapes = [(2048, 4096, 128256), (8192, 4096, 128256), (8192, 4096, 131072)]
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 3)
    return args


def methods(torch: Any, n: int, vocab: int, wanted: list[str] | None = None) -> dict[str, Any]:
    """Name -> ``fn(rows, weight, targets) -> (N,) log-probs`` (differentiable), or the reason it
    is unavailable (a string). Imports happen here, after TRITON_INTERPRET is set, and only for
    the ``wanted`` peers (all when None); a peer whose import raises anything is "unavailable"."""
    from solopo_kernels.ops import KernelOptions
    from solopo_kernels.ops.logprobs import response_logprobs

    keep_all = KernelOptions(saved_logits_bytes=4 * n * vocab)
    table: dict[str, Any] = {
        "solopo-triton": lambda r, w, t: response_logprobs(r, w, t, backend="triton"),
        "solopo-triton-tma": lambda r, w, t: response_logprobs(r, w, t, backend="triton_tma"),
        "solopo-triton-saved": lambda r, w, t: response_logprobs(
            r, w, t, backend="triton", kernel_options=keep_all
        ),
        "solopo-torch": lambda r, w, t: response_logprobs(r, w, t, backend="torch"),
        "plain-logits": lambda r, w, t: (
            torch.log_softmax((r @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
        ),
    }
    for names, importer in PEER_IMPORTS.items():
        if wanted is not None and not set(names) & set(wanted):
            continue
        try:
            table.update(zip(names, importer()))
        except Exception as error:
            reason = f"unavailable: {type(error).__name__}: {error}"[:300]
            table.update(dict.fromkeys(names, reason))
    return table


def _trl() -> list[Any]:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    try:  # TRL's backward imports maybe_gather_lm_head_ctx from here at call time
        import trl.trainer.utils  # noqa: F401
    except Exception as error:
        # trl.trainer.utils needs datasets, pandas, pyarrow and accelerate (~70 MB of wheels, more
        # than a device carry allows). The kernel takes one thing from it, in its backward:
        # maybe_gather_lm_head_ctx, a null context unless DeepSpeed ZeRO-3 is enabled (it is not).
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
        PEER_NOTES["trl-chunked-logprob"] = (
            "trl.trainer.utils does not import here "
            f"({type(error).__name__}: {str(error)[:80]}); its maybe_gather_lm_head_ctx, which TRL's "
            "backward imports, replaced by the null context it returns without ZeRO-3"
        )
    return [
        lambda r, w, t: ChunkedLogProbFunction.apply(r, w, None, t, 1.0, TRL_CHUNK, None, 1.0, ())[
            0
        ]
    ]


def _cce() -> list[Any]:
    from cut_cross_entropy import linear_cross_entropy

    return [
        lambda r, w, t: -linear_cross_entropy(r, w, t, reduction="none"),
        lambda r, w, t: -linear_cross_entropy(r, w, t, reduction="none", filter_eps=None),
    ]


def _liger() -> list[Any]:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return [lambda r, w, t: -liger_fused_linear_cross_entropy(r, w, t, reduction="none")]


# Why a peer's row is not exactly the stock setup, when it is not (shown with the results).
PEER_NOTES: dict[str, str] = {}
# Peer method names -> the function that imports the peer and returns their callables.
PEER_IMPORTS = {
    ("trl-chunked-logprob",): _trl,
    ("cce", "cce-exact"): _cce,
    ("liger-flce",): _liger,
}


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


def short_error(error: BaseException) -> str:
    message = (str(error).splitlines() or [""])[0][:200].replace("|", "/")
    return f"{type(error).__name__}: {message}"


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


def timed_runs(timer: Timer, fn, args) -> list[float]:
    """At least 3 and at most ``args.iters`` runs, stopping once they took ``time_budget``."""
    times: list[float] = []
    while len(times) < args.iters and (len(times) < 3 or sum(times) < 1e3 * args.time_budget):
        times.append(timer(fn))
    return sorted(times)


def matmul_tflops(torch: Any, timer: Timer, n: int, hidden: int, dtype, device, args) -> float:
    a = torch.randn(n, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, MATMUL_COLUMNS, dtype=dtype, device=device)
    for _ in range(args.warmup):
        a @ b
    ms = statistics.median(timed_runs(timer, lambda: a @ b, args))
    return 2 * n * hidden * MATMUL_COLUMNS / (ms * 1e-3) / 1e12


def check_correctness(torch: Any, fn, rows, weight, targets, upstream, reference) -> dict:
    """Errors of one of our methods against the float32 reference, and whether Triton ran."""
    from solopo_kernels.ops import triton_tiles

    before = dict(triton_tiles.launch_counts)
    try:
        logp = fn(rows, weight, targets)
        grad_rows, grad_weight = torch.autograd.grad(logp, [rows, weight], upstream)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        return {"pass": False, "error": short_error(error)}
    ran = {
        k: triton_tiles.launch_counts[k] - before.get(k, 0)
        for k in triton_tiles.launch_counts
        if triton_tiles.launch_counts[k] != before.get(k, 0)
    }
    ref_logp, ref_grad_rows, ref_grad_weight = reference
    errors = {
        "logp": relative_error(logp, ref_logp),
        "grad_rows": relative_error(grad_rows, ref_grad_rows),
        "grad_weight": relative_error(grad_weight, ref_grad_weight),
    }
    finite = all(math.isfinite(e) for e in errors.values())
    triton_ran = any(k in ran for k in ("forward", "tma_forward"))
    return {
        "rel_err": errors,
        "launches": ran,
        "triton_ran": triton_ran,
        "pass": finite
        and triton_ran
        and errors["logp"] <= VALUE_TOL
        and max(errors["grad_rows"], errors["grad_weight"]) <= GRAD_TOL,
    }


def run_method(torch: Any, fn, timer: Timer, rows, weight, targets, upstream, ref_logp, args):
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
    times = timed_runs(timer, step, args)
    with torch.no_grad():
        forward_ms = statistics.median(timed_runs(timer, lambda: fn(rows, weight, targets), args))
    return {
        "status": "ok",
        "median_ms": statistics.median(times),
        "forward_ms": forward_ms,
        "runs": len(times),
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1))],
        "peak_extra_mib": memory,
        "logp_rel_err_vs_fp32": logp_error,
    }


def chosen_configs() -> dict[str, str]:
    """The autotuned config of each of our kernels (after the runs), for the record."""
    from solopo_kernels.ops import triton_tiles, triton_tma_tiles

    launchers = {
        "forward": triton_tiles._forward_launcher,
        "dlogits": triton_tiles._dlogits_launcher,
        "tma_forward": triton_tma_tiles._forward_launcher,
        "tma_dlogits": triton_tma_tiles._dlogits_launcher,
    }
    return {k: str(getattr(v, "best_config", "fixed (interpreter)")) for k, v in launchers.items()}


def check_shape(torch: Any, shape, args, device, dtype, timer: Timer, save) -> dict[str, Any]:
    n, hidden, vocab = shape
    report: dict[str, Any] = {
        "N": n, "H": hidden, "V": vocab, "dtype": str(dtype).removeprefix("torch."),
        "flops_8NHV": 8 * n * hidden * vocab, "correctness": {}, "results": {},
    }  # fmt: skip
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
    element = rows.element_size()
    report["gradient_floor_mib"] = (n + vocab) * hidden * element / 2**20
    table = methods(torch, n, vocab, args.peers)

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    reference = reference_fp32(torch, rows.detach(), weight.detach(), targets, upstream)
    torch.set_float32_matmul_precision(previous)
    for name in OURS_TRITON:
        fn = table[name]
        report["correctness"][name] = check_correctness(
            torch, fn, rows, weight, targets, upstream, reference
        )
        print(f"{shape} correctness {name}: {report['correctness'][name]}", flush=True)
        save(report)
    ref_logp = reference[0]
    del reference

    report["matmul_tflops"] = matmul_tflops(torch, timer, n, hidden, dtype, device, args)
    report["matmul_bound_ms"] = 8 * n * hidden * vocab / (report["matmul_tflops"] * 1e12) * 1e3
    for name in args.peers or list(table):
        fn = table.get(name, "unavailable: unknown method")
        if isinstance(fn, str):
            report["results"][name] = {"status": fn}
            continue
        try:
            result = run_method(torch, fn, timer, rows, weight, targets, upstream, ref_logp, args)
        except Exception as error:  # a method failing must not stop the check
            report["results"][name] = {"status": f"error: {short_error(error)}"}
            traceback.print_exc(file=sys.stderr)
        else:
            result["tflops"] = 8 * n * hidden * vocab / (result["median_ms"] * 1e-3) / 1e12
            result["ratio_to_matmul_bound"] = result["median_ms"] / report["matmul_bound_ms"]
            report["results"][name] = result
        rows.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{shape} {name}: {report['results'][name]}", flush=True)
        save(report)
    report["configs"] = chosen_configs()
    report["peer_notes"] = dict(PEER_NOTES)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# solopo-kernels GPU check",
        "",
        f"{report['device_name']} ({report.get('capability')}); torch {report['torch']}, "
        f"triton {report['triton']}; {report['timestamp']}; commit {report.get('git_commit')}. "
        "Forward+backward of per-token log-probs on gathered rows; median of the timed runs "
        f"after {report['args']['warmup']} warm-up runs. `ratio` = time / (8NHV / measured "
        "matmul rate). Peers: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
    ]
    if report["interpret"]:
        lines += ["", "**Triton interpreter on the CPU: a smoke run; timings are meaningless.**"]
    for shape in report["shapes"]:
        lines += ["", f"## N={shape['N']}, H={shape['H']}, V={shape['V']}, {shape['dtype']}", ""]
        for name, c in shape["correctness"].items():
            if "error" in c:
                lines.append(f"- correctness of {name}: **FAIL** (raised {c['error']})")
                continue
            errs = ", ".join(f"{k} {v:.2e}" for k, v in c["rel_err"].items())
            lines.append(
                f"- correctness of {name} vs float32 reference: **{'PASS' if c['pass'] else 'FAIL'}** "
                f"({errs}; limits {VALUE_TOL:g} / {GRAD_TOL:g}; launches {c['launches']})"
            )
        if "matmul_tflops" in shape:
            lines.append(
                f"- {shape['dtype']} matmul rate {shape['matmul_tflops']:.3g} TFLOP/s, 8NHV bound "
                f"{shape['matmul_bound_ms']:.3g} ms; gradient floor (dW + dhidden) "
                f"{shape['gradient_floor_mib']:.0f} MiB; configs {shape.get('configs')}"
            )
        lines += [
            "",
            "| method | status | fwd+bwd ms (median) | p20-p80 ms | runs | fwd ms | TFLOP/s (8NHV) | ratio | extra peak MiB | logp rel err |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, note in shape.get("peer_notes", {}).items():
            lines.append(f"- note on {name}: {note}")
        for name, r in shape["results"].items():
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']} | | | | | | | | |")
                continue
            memory = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
            lines.append(
                f"| {name} | ok | {r['median_ms']:.2f} | {r['p20_ms']:.2f}-{r['p80_ms']:.2f} | "
                f"{r['runs']} | {r['forward_ms']:.2f} | {r['tflops']:.3g} | "
                f"{r['ratio_to_matmul_bound']:.2f} | {memory} | {r['logp_rel_err_vs_fp32']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def environment(torch: Any, triton: Any, device: Any, args) -> dict[str, Any]:
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cuda = device.type == "cuda"
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "interpret": args.interpret,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": [],
    }


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
    timer = Timer(torch, device)
    report = environment(torch, triton, device, args)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(current: dict[str, Any] | None = None) -> None:
        shapes = report["shapes"] + ([current] if current is not None else [])
        snapshot = {**report, "shapes": shapes}
        (args.out / "gpu_check.json").write_text(json.dumps(snapshot, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(snapshot))

    for shape in args.shapes:
        try:
            result = check_shape(torch, shape, args, device, dtype, timer, save)
        except Exception as error:  # e.g. out of memory building the inputs: keep going
            traceback.print_exc(file=sys.stderr)
            result = {"N": shape[0], "H": shape[1], "V": shape[2], "dtype": args.dtype,
                      "correctness": {"setup": {"pass": False, "error": short_error(error)}},
                      "results": {}}  # fmt: skip
        report["shapes"].append(result)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    passed = all(c["pass"] for s in report["shapes"] for c in s["correctness"].values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
