"""The float32-accumulating GEMM routes (``solopo_kernels.ops.gemm_routes``): each route computes
what it says (mocked ``torch.addmm``/``torch.mm`` where the CPU has no ``out_dtype`` GEMMs), and
the first-use probe falls back, with one warning naming the route, when a route raises or returns
wrong values (fault injection: the CPU's real ``out_dtype`` GEMMs raise, and routes are replaced
by wrong ones on purpose).

Tolerance: the upcast route within 1e-6 relative of float64 (exact 16-bit products summed in
float32).
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

from solopo_kernels.ops import gemm_routes
from tests import reference

CPU = torch.device("cpu")


def _half_operands(dtype=torch.bfloat16):
    return torch.randn(6, 5).to(dtype), torch.randn(5, 4).to(dtype), torch.randn(6, 4)


@pytest.mark.parametrize("accumulate", [True, False])
def test_addmm_out_dtype_route_is_one_float32_output_gemm(accumulate):
    a, b, acc = _half_operands()
    with mock.patch.object(torch, "addmm") as addmm:
        gemm_routes.matmul_into(acc, a, b, accumulate=accumulate, route="addmm_out_dtype")
    (call,) = addmm.call_args_list
    assert call.args[1] is a and call.args[2] is b
    assert call.kwargs == {"beta": int(accumulate), "out_dtype": torch.float32, "out": acc}


def test_mm_out_dtype_route_adds_a_float32_product():
    a, b, acc = _half_operands(torch.float16)
    start = acc.clone()
    product = torch.randn(6, 4)
    with mock.patch.object(torch, "mm", return_value=product) as mm:
        gemm_routes.matmul_into(acc, a, b, accumulate=True, route="mm_out_dtype")
    assert mm.call_args.kwargs == {"out_dtype": torch.float32}
    torch.testing.assert_close(acc, start + product, rtol=0, atol=0)
    with mock.patch.object(torch, "mm") as mm:
        gemm_routes.matmul_into(acc, a, b, accumulate=False, route="mm_out_dtype")
    assert mm.call_args.kwargs == {"out_dtype": torch.float32, "out": acc}


@pytest.mark.parametrize("accumulate", [True, False])
def test_upcast_route_is_exact(accumulate):
    """The CPU (and interpreter) route: 16-bit operands up-cast, summed in float32."""
    a, b, acc = _half_operands()
    start = acc.clone()
    gemm_routes.matmul_into(acc, a, b, accumulate=accumulate)
    expected = a.double() @ b.double() + (start.double() if accumulate else 0)
    reference.assert_close_rel(acc, expected, 1e-6, "upcast matmul")


def test_cpu_takes_upcast_without_a_probe():
    with mock.patch.object(gemm_routes, "probe_gemm_route") as probe:
        assert gemm_routes.gemm_route(CPU, torch.bfloat16) == "upcast"
    probe.assert_not_called()


def test_probe_of_routes_that_raise_falls_back_to_upcast_with_one_warning():
    """The CPU has no out_dtype GEMMs: both fast routes really raise there."""
    with pytest.warns(RuntimeWarning) as caught:
        route = gemm_routes.probe_gemm_route(CPU, torch.bfloat16)
    assert route == "upcast"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "addmm_out_dtype raised" in message and "mm_out_dtype raised" in message
    assert "'upcast' route" in message and "solopo_kernels.doctor" in message


def _emulated(route_error: float = 0.0, nan_over_beta0: bool = False):
    """A route that computes ``beta * out + a @ b`` in float32 (what CUDA's out_dtype GEMMs do),
    plus a relative error on purpose, or NaN kept from ``out`` when ``beta == 0``."""

    def impl(out, a, b, beta):
        product = a.float() @ b.float()
        if beta == 0 and nan_over_beta0:
            out.add_(product)  # NaN * 0 is NaN: what a wrong beta=0 path would leave
            return
        result = product + (out if beta else 0)
        out.copy_(result * (1 + route_error))

    return impl


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(_emulated(route_error=1e-2), id="wrong-values"),
        pytest.param(_emulated(nan_over_beta0=True), id="nan-with-beta-0"),
    ],
)
def test_probe_rejects_a_wrong_route_and_takes_the_next_that_works(broken):
    routes = {**gemm_routes.ROUTE_IMPLS, "addmm_out_dtype": broken, "mm_out_dtype": _emulated()}
    with mock.patch.dict(gemm_routes.ROUTE_IMPLS, routes):
        with pytest.warns(RuntimeWarning, match="addmm_out_dtype differed from float32") as caught:
            route = gemm_routes.probe_gemm_route(CPU, torch.bfloat16)
    assert route == "mm_out_dtype" and len(caught) == 1
    assert "'mm_out_dtype' route" in str(caught[0].message)


def test_a_working_first_route_is_taken_silently():
    routes = {**gemm_routes.ROUTE_IMPLS, "addmm_out_dtype": _emulated()}
    with mock.patch.dict(gemm_routes.ROUTE_IMPLS, routes), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gemm_routes.probe_gemm_route(CPU, torch.float16) == "addmm_out_dtype"


def test_the_probe_runs_once_per_device_and_dtype_and_matmul_into_uses_its_route():
    """With probing forced on for the CPU (standing in for CUDA) and a raising fast route: one
    warning for the first (device, dtype), none after; a new dtype probes again; and matmul_into
    computes through the chosen route."""
    calls = []
    emulated = _emulated()

    def spy(out, a, b, beta):
        calls.append(beta)
        emulated(out, a, b, beta)

    with (
        mock.patch.dict(gemm_routes.ROUTE_IMPLS, {"mm_out_dtype": spy}),
        mock.patch.object(gemm_routes, "probes_routes", lambda device: True),
        mock.patch.dict(gemm_routes._chosen, clear=True),
    ):
        with pytest.warns(RuntimeWarning):
            assert gemm_routes.gemm_route(CPU, torch.bfloat16) == "mm_out_dtype"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert gemm_routes.gemm_route(CPU, torch.bfloat16) == "mm_out_dtype"
            a, b, acc = _half_operands()
            start = acc.clone()
            calls.clear()
            gemm_routes.matmul_into(acc, a, b, accumulate=True)
        assert calls == [1]
        reference.assert_close_rel(acc, start.double() + a.double() @ b.double(), 1e-6, "route")
        with pytest.warns(RuntimeWarning):
            gemm_routes.gemm_route(CPU, torch.float16)


def test_the_probe_is_not_fooled_by_the_callers_autocast():
    """The first use can come from a forward under autocast: the probe's reference must not be
    a 16-bit GEMM then (a working route would be judged wrong, and upcast kept for good)."""
    routes = {**gemm_routes.ROUTE_IMPLS, "addmm_out_dtype": _emulated()}
    with mock.patch.dict(gemm_routes.ROUTE_IMPLS, routes), warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert gemm_routes.probe_gemm_route(CPU, torch.bfloat16) == "addmm_out_dtype"
