"""``python -m solopo_kernels.doctor``: what this machine runs, whether it is right, and how fast.

Shipped with the package, so that a user can answer, on their own GPU, the three questions a
report needs:

1. **Environment and dispatch.** Python, torch (and its CUDA), Triton, the GPU and its driver, the
   peer packages; for each input dtype (and a float32 head with 16-bit hidden states) which
   backend ``backend="auto"`` runs, which float32-accumulating GEMM route the backward takes
   (:mod:`.ops.gemm_routes`), and the verdict of the first-use self-check (:mod:`.ops.self_check`).
2. **Correctness** of every backend available here (on CUDA: ``triton``, ``triton_tma``, the Triton
   kernels with saved logits, with a float32 head, and ``torch``; on the CPU: ``torch``, and the
   Triton kernels only under ``--interpret``) against a float64 reference that materialises the
   logits a token chunk at a time: per-token log-probs and the gradients of ``sum(g * logp)``
   w.r.t. the rows and the weight. Pass: values <= 1e-4 and gradients <= 2e-2 relative (``max
   |err| / max |ref|``; the tests' limits on small shapes are 1e-5 and 1e-2), finite, and for a
   Triton method the kernel really ran (the check calls that backend by name, which never falls
   back; a TMA call on operands TMA cannot address is reported as such).
3. **Speed and memory**: forward+backward on the same gathered rows, median of the runs that fit in
   ``--time-budget`` seconds after ``--warmup`` runs, and the extra peak memory of one step (CUDA),
   for ours and the peers that import (TRL's chunked log-prob, Liger's fused linear cross-entropy,
   Cut Cross-Entropy, plain materialised logits); on CUDA also TFLOP/s (``8 N H V`` per step) and
   the ratio to ``8 N H V`` at the measured bf16 matmul rate.

Default shapes (``N x H x V``): on CUDA 8192x4096x128256 (Llama-3's head) and 8192x3584x152064
(Qwen2.5-7B's), bf16; on the CPU 256x64x1000, float32. The report is printed as markdown; ``--json
PATH`` (and ``--markdown PATH``) write it, after every method, so a run cut short keeps what it
measured. Exit status 1 if any correctness check failed or raised, 0 otherwise (2: bad usage).
A peer that cannot run on this device (Liger's and CCE's Triton kernels need CUDA) is one line,
``cut-cross-entropy: needs CUDA, skipped``, and a row with that status; an error is one line
too, its traceback only with ``--verbose``. ``benchmarks/gpu_check.py`` is a caller of this module.
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

VALUE_TOL, GRAD_TOL = 1e-4, 2e-2
MATMUL_COLUMNS = 32768
# TRL 1.16's vocabulary chunk for ChunkedLogProbFunction (trl.trainer.utils
# _CHUNKED_LOGPROB_CHUNK_SIZE); read from there it would import datasets, pandas and pyarrow.
TRL_CHUNK = 32768
PACKAGES = (
    "solopo-kernels", "torch", "triton", "transformers", "trl", "liger-kernel",
    "cut-cross-entropy", "flash-attn", "deepspeed", "accelerate",
)  # fmt: skip
GPU_SHAPES = [(8192, 4096, 128256), (8192, 3584, 152064)]
CPU_SHAPES = [(256, 64, 1000)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m solopo_kernels.doctor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="also check the Triton kernels on the CPU, in Triton's interpreter (slow)",
    )
    parser.add_argument("--shapes", nargs="+", help="NxHxV shapes (defaults: see the docstring)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--warmup", type=int, help="excluded runs per method (3 on CUDA, 1 CPU)")
    parser.add_argument("--iters", type=int, help="most timed runs per method (default 20)")
    parser.add_argument(
        "--time-budget", type=float, default=2.0, help="seconds of timed runs per method"
    )
    parser.add_argument("--peers", nargs="+", help="methods to time (default: all)")
    parser.add_argument("--no-timing", action="store_true", help="environment and correctness only")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report as markdown here")
    parser.add_argument(
        "--verbose", action="store_true", help="print the traceback of every error, not one line"
    )
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.interpret and args.device != "cpu":
        parser.error("--interpret runs the Triton kernels on the CPU: use it with --device cpu")
    cuda = args.device == "cuda"
    try:
        args.shapes = (
            [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
            if args.shapes
            else (GPU_SHAPES if cuda else CPU_SHAPES)
        )
    except ValueError:
        parser.error(f"--shapes: expected NxHxV integers, got {args.shapes}")
    if any(len(s) != 3 or min(s) <= 0 for s in args.shapes):
        parser.error(f"--shapes: expected NxHxV positive integers, got {args.shapes}")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 3)
    return args


def triton_here(args: argparse.Namespace) -> bool:
    """Whether the Triton kernels are checked in this run (CUDA, or the CPU interpreter)."""
    from .ops.logprobs import triton_available

    return triton_available() and (args.device == "cuda" or args.interpret)


def our_methods(args: argparse.Namespace, n: int, vocab: int) -> dict[str, Any]:
    """Name -> ``fn(rows, weight, targets) -> (N,) log-probs`` for each of our backends that
    runs here. Triton backends are called by name: they raise rather than fall back."""
    import torch

    from .ops import KernelOptions
    from .ops.logprobs import response_logprobs

    keep_all = KernelOptions(saved_logits_bytes=4 * n * vocab)
    table: dict[str, Any] = {"solopo-torch": lambda r, w, t: response_logprobs(r, w, t, backend="torch")}
    if triton_here(args):
        table.update({
            "solopo-triton": lambda r, w, t: response_logprobs(r, w, t, backend="triton"),
            "solopo-triton-tma": lambda r, w, t: response_logprobs(r, w, t, backend="triton_tma"),
            "solopo-triton-saved": lambda r, w, t: response_logprobs(
                r, w, t, backend="triton", kernel_options=keep_all
            ),
        })  # fmt: skip
    mixed_backend = "triton" if triton_here(args) else "torch"
    table[f"solopo-{mixed_backend}-fp32-head"] = "mixed"  # built per shape (needs a float32 head)
    table["plain-logits"] = lambda r, w, t: (
        torch.log_softmax((r @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
    )
    return table


def peer_methods(wanted: list[str] | None, device: Any = None) -> dict[str, Any]:
    """The peers' methods that import and can run on ``device`` (a string with the reason for
    those that do not: ``"skipped: needs CUDA"``, ``"unavailable: ..."``). Prints one line per
    peer package skipped for its device."""
    table: dict[str, Any] = {}
    device_type = getattr(device, "type", device)
    for names, importer in PEER_IMPORTS.items():
        if wanted is not None and not set(names) & set(wanted):
            continue
        package = PEER_PACKAGES[names]
        if device_type is not None and package in NEEDS_CUDA and device_type != "cuda":
            print(f"{package}: needs CUDA, skipped", flush=True)
            table.update(dict.fromkeys(names, "skipped: needs CUDA"))
            continue
        try:
            table.update(zip(names, importer()))
        except Exception as error:  # any import failure makes the peer "unavailable"
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
# Peer method names -> the package they come from (named when a peer is skipped).
PEER_PACKAGES = {
    ("trl-chunked-logprob",): "trl",
    ("cce", "cce-exact"): "cut-cross-entropy",
    ("liger-flce",): "liger-kernel",
}
# Peers whose kernels are Triton GPU kernels with no CPU path (TRL's falls back to torch).
NEEDS_CUDA = {"cut-cross-entropy", "liger-kernel"}


def reference_fp64(rows, weight, targets, upstream, chunk: int = 1024):
    """float64 log-probs and gradients of ``sum(upstream * logp)`` (rows and weight), from
    materialised float64 logits a token chunk at a time. Independent of the package's kernels."""
    import torch

    rows64, weight64 = rows.double(), weight.double()
    n = rows.shape[0]
    logp = torch.empty(n, dtype=torch.float64, device=rows.device)
    grad_rows = torch.empty_like(rows64)
    grad_weight = torch.zeros_like(weight64)
    for t0 in range(0, n, chunk):
        t1 = min(t0 + chunk, n)
        log_probs = torch.log_softmax(rows64[t0:t1] @ weight64.t(), -1)
        picked = targets[t0:t1, None]
        logp[t0:t1] = log_probs.gather(1, picked).squeeze(1)
        g = upstream[t0:t1, None].double()
        dlogits = log_probs.exp_().mul_(-g).scatter_add_(1, picked, g)
        grad_rows[t0:t1] = dlogits @ weight64
        grad_weight.addmm_(dlogits.t(), rows64[t0:t1])
    return logp, grad_rows, grad_weight


def relative_error(actual, expected) -> float:
    scale = expected.double().abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item() / (scale or 1.0)
    return float("inf") if error != error else error


def short_error(error: BaseException) -> str:
    message = (str(error).splitlines() or [""])[0][:200].replace("|", "/")
    return f"{type(error).__name__}: {message}"


def report_error(what: str, error: BaseException, verbose: bool) -> None:
    """One line on stderr for an error the doctor caught (and goes on after); the traceback
    too with ``--verbose``."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    hint = "" if verbose else " (--verbose for the traceback)"
    print(f"{what}: {short_error(error)}{hint}", file=sys.stderr, flush=True)


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere; milliseconds."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        import torch

        if self.cuda:
            start, end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
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


def matmul_tflops(timer: Timer, n: int, hidden: int, dtype, device, args) -> float:
    import torch

    a = torch.randn(n, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, MATMUL_COLUMNS, dtype=dtype, device=device)
    for _ in range(args.warmup):
        a @ b
    ms = statistics.median(timed_runs(timer, lambda: a @ b, args))
    return 2 * n * hidden * MATMUL_COLUMNS / (ms * 1e-3) / 1e12


def check_correctness(
    name: str, fn, rows, weight, targets, upstream, reference, verbose: bool = False
) -> dict:
    """Errors of one of our methods against the float64 reference."""
    import torch

    from .ops import triton_tma_tiles
    from .ops.logprobs import triton_available

    try:
        logp = fn(rows, weight, targets)
        grad_rows, grad_weight = torch.autograd.grad(logp, [rows, weight], upstream)
    except Exception as error:
        report_error(f"correctness of {name}", error, verbose)
        return {"pass": False, "error": short_error(error)}
    ref_logp, ref_grad_rows, ref_grad_weight = reference
    errors = {
        "logp": relative_error(logp, ref_logp),
        "grad_rows": relative_error(grad_rows, ref_grad_rows),
        "grad_weight": relative_error(grad_weight, ref_grad_weight),
    }
    result: dict[str, Any] = {
        "rel_err": errors,
        "pass": errors["logp"] <= VALUE_TOL and max(errors["grad_rows"], errors["grad_weight"]) <= GRAD_TOL,
    }
    if "tma" in name and triton_available():
        result["tma_used"] = triton_tma_tiles.tma_compatible(rows, weight)
    return result


def run_method(fn, timer: Timer, rows, weight, targets, upstream, args) -> dict[str, Any]:
    import torch

    def step():
        rows.grad = weight.grad = None
        torch.autograd.backward(fn(rows, weight, targets), upstream)

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
    }


def chosen_configs() -> dict[str, str]:
    """The autotuned config of each of our kernels (after the runs), for the record."""
    from .ops import triton_tiles, triton_tma_tiles

    launchers = {
        "forward": triton_tiles.FORWARD_LAUNCHER,
        "dlogits": triton_tiles.DLOGITS_LAUNCHER,
        "tma_forward": triton_tma_tiles.FORWARD_LAUNCHER,
        "tma_dlogits": triton_tma_tiles.DLOGITS_LAUNCHER,
    }
    return {k: str(getattr(v, "best_config", "fixed (interpreter)")) for k, v in launchers.items()}


def dispatch_report(device, args) -> list[dict[str, Any]]:
    """Per (hidden dtype, weight dtype): the backend ``auto`` runs, the GEMM route, the
    self-check's verdict (run here if it had not run yet)."""
    import torch

    from .ops import gemm_routes, self_check
    from .ops.logprobs import auto_backend, checked_backend

    rows_out = []
    pairs = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
             (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]  # fmt: skip
    for hidden_dtype, weight_dtype in pairs:
        entry: dict[str, Any] = {
            "hidden": str(hidden_dtype).removeprefix("torch."),
            "weight": str(weight_dtype).removeprefix("torch."),
            "auto_names": auto_backend(device, hidden_dtype),
        }
        rows = torch.zeros(1, 8, dtype=hidden_dtype, device=device)
        weight = torch.zeros(8, 8, dtype=weight_dtype, device=device)
        try:
            with _warnings_as_notes(entry):
                module = checked_backend("auto", rows, weight)
            entry["auto_runs"] = module.__name__.rsplit(".", 1)[-1].removesuffix("_tiles")
            key = (entry["auto_names"], str(device), hidden_dtype, weight_dtype)
            if key in self_check._results:
                entry["self_check"] = self_check._results[key] or "passed"
            elif entry["auto_names"].startswith("triton"):
                entry["self_check"] = "off" if not self_check.enabled() else "not run on this device"
            if hidden_dtype in gemm_routes.HALF_DTYPES:
                with _warnings_as_notes(entry):
                    entry["gemm_route"] = gemm_routes.gemm_route(device, hidden_dtype)
        except Exception as error:  # a crash here is itself the finding
            entry["error"] = short_error(error)
        rows_out.append(entry)
    return rows_out


@contextlib.contextmanager
def _warnings_as_notes(entry: dict[str, Any]):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if caught:
        entry.setdefault("warnings", []).extend(str(w.message) for w in caught)


def check_shape(shape, args, device, dtype, timer: Timer, save, peers=None) -> dict[str, Any]:
    """Correctness, then timings, of every method at one ``N x H x V`` shape; ``peers``: the
    peers' table of :func:`peer_methods` (None: built here)."""
    import torch

    n, hidden, vocab = shape
    report: dict[str, Any] = {
        "N": n, "H": hidden, "V": vocab, "dtype": str(dtype).removeprefix("torch."),
        "flops_8NHV": 8 * n * hidden * vocab, "correctness": {}, "results": {},
    }  # fmt: skip
    torch.manual_seed(0)
    # Logits with a spread like a trained head's (std ~4), targets anywhere incl. the last id.
    rows = torch.randn(n, hidden, device=device).to(dtype).requires_grad_()
    weight32 = torch.randn(vocab, hidden, device=device) * 4 / math.sqrt(hidden)
    weight = weight32.to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[-1] = vocab - 1
    upstream = torch.randn(n, device=device)
    report["gradient_floor_mib"] = (n + vocab) * hidden * rows.element_size() / 2**20
    ours = our_methods(args, n, vocab)

    # The float32-head check uses the head that rounds to `weight` exactly, so one reference
    # serves every method; its weight gradient is compared in float32.
    head32 = weight.detach().float().requires_grad_()
    reference = reference_fp64(rows.detach(), weight.detach(), targets, upstream)
    for name, fn in ours.items():
        if name == "plain-logits":
            continue
        if fn == "mixed":
            if dtype == torch.float32:
                continue
            backend = "triton" if "triton" in name else "torch"
            from .ops.logprobs import response_logprobs

            result = check_correctness(
                name, lambda r, w, t, b=backend: response_logprobs(r, head32, t, backend=b),
                rows, head32, targets, upstream, reference, args.verbose,
            )  # fmt: skip
        else:
            result = check_correctness(
                name, fn, rows, weight, targets, upstream, reference, args.verbose
            )
        report["correctness"][name] = result
        print(f"{shape} correctness {name}: {result}", flush=True)
        save(report)
    del reference
    if args.no_timing:
        return report

    if device.type == "cuda":
        report["matmul_tflops"] = matmul_tflops(timer, n, hidden, dtype, device, args)
        report["matmul_bound_ms"] = 8 * n * hidden * vocab / (report["matmul_tflops"] * 1e12) * 1e3
    table = {k: v for k, v in ours.items() if v != "mixed"}
    table.update(peers if peers is not None else peer_methods(args.peers, device))
    for name in args.peers or list(table):
        fn = table.get(name, "unavailable: unknown method")
        if isinstance(fn, str):
            report["results"][name] = {"status": fn}
            continue
        try:
            result = run_method(fn, timer, rows, weight, targets, upstream, args)
        except Exception as error:  # a method failing must not stop the check
            report["results"][name] = {"status": f"error: {short_error(error)}"}
            report_error(f"{shape} {name}", error, args.verbose)
        else:
            result["tflops"] = 8 * n * hidden * vocab / (result["median_ms"] * 1e-3) / 1e12
            if "matmul_bound_ms" in report:
                result["ratio_to_matmul_bound"] = result["median_ms"] / report["matmul_bound_ms"]
            report["results"][name] = result
        rows.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{shape} {name}: {report['results'][name]}", flush=True)
        save(report)
    if triton_here(args):
        report["configs"] = chosen_configs()
    report["peer_notes"] = dict(PEER_NOTES)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# solopo-kernels doctor",
        "",
        f"{report['device_name']} ({report.get('capability')}, driver {report.get('driver')}); "
        f"Python {report['python']}; {report['timestamp']}. Packages: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
    ]
    if report["interpret"]:
        lines += ["", "**Triton interpreter on the CPU: timings are meaningless.**"]
    lines += ["", "## Dispatch", "", "| hidden | weight | auto names | auto runs | GEMM route | self-check |", "|---|---|---|---|---|---|"]
    for d in report["dispatch"]:
        lines.append(
            f"| {d['hidden']} | {d['weight']} | {d['auto_names']} | {d.get('auto_runs', d.get('error'))} "
            f"| {d.get('gemm_route', '-')} | {str(d.get('self_check', '-')).replace('|', '/')} |"
        )
        lines += [f"- warning: {w}" for w in d.get("warnings", [])]
    for shape in report["shapes"]:
        lines += ["", f"## N={shape['N']}, H={shape['H']}, V={shape['V']}, {shape['dtype']}", ""]
        for name, c in shape["correctness"].items():
            if "error" in c:
                lines.append(f"- correctness of {name}: **FAIL** (raised {c['error']})")
                continue
            errs = ", ".join(f"{k} {v:.2e}" for k, v in c["rel_err"].items())
            tma = "" if "tma_used" not in c else f"; TMA {'used' if c['tma_used'] else 'not usable: pointer kernels'}"
            lines.append(
                f"- correctness of {name} vs float64: **{'PASS' if c['pass'] else 'FAIL'}** "
                f"({errs}; limits {VALUE_TOL:g} / {GRAD_TOL:g}{tma})"
            )
        if "matmul_tflops" in shape:
            lines.append(
                f"- {shape['dtype']} matmul rate {shape['matmul_tflops']:.3g} TFLOP/s, 8NHV bound "
                f"{shape['matmul_bound_ms']:.3g} ms; gradient floor (dW + dhidden) "
                f"{shape['gradient_floor_mib']:.0f} MiB; configs {shape.get('configs')}"
            )
        if not shape["results"]:
            continue
        lines += [
            "",
            "| method | status | fwd+bwd ms (median) | p20-p80 ms | runs | fwd ms | TFLOP/s (8NHV) | ratio to 8NHV bound | extra peak MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, note in shape.get("peer_notes", {}).items():
            lines.append(f"- note on {name}: {note}")
        for name, r in shape["results"].items():
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']} | | | | | | | |")
                continue
            memory = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
            ratio = f"{r['ratio_to_matmul_bound']:.2f}" if "ratio_to_matmul_bound" in r else "n/a"
            lines.append(
                f"| {name} | ok | {r['median_ms']:.2f} | {r['p20_ms']:.2f}-{r['p80_ms']:.2f} | "
                f"{r['runs']} | {r['forward_ms']:.2f} | {r['tflops']:.3g} | {ratio} | {memory} |"
            )
    verdict = "PASS" if report.get("passed") else "FAIL"
    lines += ["", f"**Correctness: {verdict}.**"]
    return "\n".join(lines) + "\n"


def environment(device, args) -> dict[str, Any]:
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cuda = device.type == "cuda"
    driver = None
    if cuda:
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True, timeout=20,
            ).stdout.strip().splitlines()[0]  # fmt: skip
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "driver": driver,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": versions,
        "interpret": args.interpret,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": [],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--interpret: triton was imported before TRITON_INTERPRET=1 could be set; "
                  "run the doctor in a fresh process", file=sys.stderr)  # fmt: skip
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda":  # with its index: the probes and the self-check key on "cuda:N"
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    timer = Timer(device)
    report = environment(device, args)
    report["dispatch"] = dispatch_report(device, args)

    def save(current: dict[str, Any] | None = None) -> None:
        shapes = report["shapes"] + ([current] if current is not None else [])
        snapshot = {**report, "shapes": shapes}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(snapshot, indent=2) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown(snapshot))

    # The peers are imported (or skipped, one line each) once, not once per shape.
    peers = None if args.no_timing else peer_methods(args.peers, device)
    for shape in args.shapes:
        try:
            result = check_shape(shape, args, device, dtype, timer, save, peers)
        except Exception as error:  # e.g. out of memory building the inputs: keep going
            report_error(f"{shape}", error, args.verbose)
            result = {"N": shape[0], "H": shape[1], "V": shape[2], "dtype": args.dtype,
                      "correctness": {"setup": {"pass": False, "error": short_error(error)}},
                      "results": {}}  # fmt: skip
        report["shapes"].append(result)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dispatch_ok = all("error" not in d for d in report["dispatch"])
    report["passed"] = dispatch_ok and all(
        c["pass"] for s in report["shapes"] for c in s["correctness"].values()
    )
    save()
    print(markdown(report))
    written = [str(p) for p in (args.json, args.markdown) if p]
    if written:
        print("wrote " + " and ".join(written))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
