"""How a GEMM of 16-bit operands adds into a float32 accumulator, chosen by a probe, not a table.

The backward of both backends sums ``dlogits @ W_tile`` and ``dlogits^T @ rows_tile`` over many
tiles. With bf16/fp16 operands the partial products must not be rounded to 16 bits between tiles,
so they go into a float32 accumulator. On CUDA there are three ways (*routes*), fastest first:

* ``"addmm_out_dtype"``: ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``: one
  tensor-core GEMM whose ``C`` is the float32 accumulator;
* ``"mm_out_dtype"``: ``torch.mm(a, b, out_dtype=torch.float32)`` into a scratch tile, then an add
  (one extra read and write of the tile);
* ``"upcast"``: operands up-cast to float32 and an IEEE float32 GEMM (exact, since 16-bit values
  are exact in float32, but several times slower on tensor-core GPUs). Always correct.

Which of them works depends on the torch build and the GPU: the ``out_dtype`` overloads exist
only on CUDA, and their support for a float32 ``self`` with 16-bit ``mat1``/``mat2``, a transposed
``mat1``, ``beta=0`` and ``out`` aliasing ``self`` has changed between releases. So instead of a
version table, :func:`gemm_route` runs a tiny probe the first time a ``(device, dtype)`` needs a
route: each route, fastest first, computes those exact call patterns (a transposed and a
contiguous ``mat1``; accumulate into finite values; overwrite an accumulator full of NaN with
``beta=0``) and is compared with a float32 computation of the same products. The first route that
neither raises nor differs is kept for the process. A route that fails is reported in one warning
naming it, the error, and the route used instead. The probe costs a few microsecond-sized GEMMs
once per ``(device, dtype)``. On the CPU every mixed product takes ``"upcast"`` without a probe:
the CPU has no ``out_dtype`` GEMMs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["GEMM_ROUTES", "gemm_route", "matmul_into", "probe_gemm_route"]

GEMM_ROUTES = ("addmm_out_dtype", "mm_out_dtype", "upcast")
HALF_DTYPES = (torch.bfloat16, torch.float16)
# A route's probe result may differ from the float32 computation by float32 summation-order noise
# only: K = 64 products of exact 16-bit values, |terms| ~ 1, so errors are ~ 64 * 2**-24.
PROBE_TOLERANCE = 1e-4

# (device, dtype) -> the route the probe chose. One probe per key and process.
_chosen: dict[tuple[str, torch.dtype], str] = {}


def _addmm_out_dtype(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int) -> None:
    torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)


def _mm_out_dtype(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int) -> None:
    if beta:
        out.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def _upcast(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int) -> None:
    torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=beta, out=out)


# Route name -> ``impl(out, a, b, beta)``: ``out = beta * out + a @ b`` with ``beta`` 0 or 1.
ROUTE_IMPLS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]] = {
    "addmm_out_dtype": _addmm_out_dtype,
    "mm_out_dtype": _mm_out_dtype,
    "upcast": _upcast,
}


@torch.no_grad()
def _probe_error(route: str, device: torch.device, dtype: torch.dtype) -> float:
    """Largest relative difference between ``route`` and a float64 computation over the call
    patterns of the backward (raises whatever the route raises). Autocast is off inside: the
    first use can come from a forward under autocast, which would turn the reference's GEMM
    into a 16-bit one."""
    with torch.autocast(device.type, enabled=False):
        return _probe_error_exact(route, device, dtype)


def _probe_error_exact(route: str, device: torch.device, dtype: torch.dtype) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    rows, cols, depth = 48, 40, 64
    worst = 0.0
    # (a as passed, accumulate): a transposed mat1 (the weight gradient's dlogits.t()) and a
    # contiguous one (grad_rows), each added into finite values and written over NaN.
    for transposed in (True, False):
        for beta in (1, 0):
            a32 = random(depth, rows).t() if transposed else random(rows, depth)
            a = a32.to(dtype)
            b = random(depth, cols).to(dtype)
            start = random(rows, cols)
            out = start.clone() if beta else torch.full_like(start, float("nan"))
            ROUTE_IMPLS[route](out, a, b, beta)
            expected = a.double() @ b.double() + (start.double() if beta else 0)
            scale = expected.abs().max().item() or 1.0
            error = (out.double() - expected).abs().max().item() / scale
            if not error <= PROBE_TOLERANCE:  # NaN fails too
                return float("inf") if error != error else error
            worst = max(worst, error)
    return worst


def probe_gemm_route(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest route of :data:`GEMM_ROUTES` that computes the backward's call patterns
    correctly for 16-bit ``dtype`` operands on ``device``; warns once per failing route."""
    failures = []
    for route in GEMM_ROUTES:
        if route == "upcast":  # exact by construction: the last resort is never probed
            break
        try:
            error = _probe_error(route, device, dtype)
        except Exception as exc:  # any failure of a route means: take the next one
            failures.append(f"{route} raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        if error <= PROBE_TOLERANCE:
            break
        failures.append(
            f"{route} differed from float32 by {error:.2e} (relative; tolerance {PROBE_TOLERANCE:g})"
        )
    if failures:
        warnings.warn(
            f"solopo_kernels: float32-accumulating GEMM of {dtype} operands on {device}: "
            + "; ".join(failures)
            + f". Using the {route!r} route instead (correct, "
            + ("slower" if route == "upcast" else "one extra pass per tile")
            + "). Please report: python -m solopo_kernels.doctor",
            RuntimeWarning,
            stacklevel=3,
        )
    return route


def probes_routes(device: torch.device) -> bool:
    """Whether ``device`` has ``out_dtype`` GEMMs worth probing (CUDA); elsewhere "upcast"."""
    return device.type == "cuda"


def gemm_route(device: torch.device, dtype: torch.dtype) -> str:
    """The route for 16-bit ``dtype`` operands into float32 on ``device``: probed on first use
    per ``(device, dtype)`` on CUDA, ``"upcast"`` elsewhere."""
    if not probes_routes(device):
        return "upcast"
    key = (str(device), dtype)
    if key not in _chosen:
        _chosen[key] = probe_gemm_route(device, dtype)
    return _chosen[key]


def matmul_into(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    accumulate: bool,
    route: str | None = None,
) -> None:
    """``out += a @ b`` (``accumulate``) or ``out = a @ b``, summed in ``out``'s dtype or wider.

    ``a`` and ``b`` of ``out``'s dtype: one GEMM (a 16-bit ``out`` is only ever written, never
    accumulated into: the GEMM sums in float32 inside and rounds once). 16-bit ``a``/``b`` into a
    float32 ``out``: :func:`gemm_route`'s route (``route`` overrides it, for tests). Anything
    else: operands up-cast to ``out``'s dtype (exact: 16-bit values are exact in float32).
    """
    beta = 1 if accumulate else 0
    if a.dtype == b.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
        return
    if a.dtype == b.dtype and a.dtype in HALF_DTYPES and out.dtype == torch.float32:
        route = route or gemm_route(out.device, a.dtype)
    else:
        route = "upcast"
    ROUTE_IMPLS[route](out, a, b, beta)
