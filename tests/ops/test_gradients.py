"""The shared backward tile loop (``solopo_kernels.ops.gradients``): the weight-gradient
accumulator, written straight into the gradient when one token tile covers every row, else a
float32 buffer under its byte cap. (The GEMM routes are tests/ops/test_gemm_routes.py.)

Tolerances: float32 gradients <= 1e-6 relative to float64; 16-bit gradients within one rounding
(``2**-8`` relative, elementwise) of the float64 product, i.e. summed in float32 and rounded once.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from solopo_kernels.ops import gradients
from solopo_kernels.ops.tiles import Tiles
from tests import reference
from tests.instruments import AllocationRecorder


def _gradient_problem(n_rows, vocab, hidden, dtype):
    rows = torch.randn(n_rows, hidden).to(dtype)
    weight = torch.randn(vocab, hidden).to(dtype)
    dlogits = torch.randn(n_rows, vocab).to(dtype)  # what a backend's fill would return

    def fill(t0, t1, v0, v1):
        return dlogits[t0:t1, v0:v1]

    expected_rows = dlogits.double() @ weight.double()
    expected_weight = dlogits.double().t() @ rows.double()
    return rows, weight, fill, expected_rows, expected_weight


def _within_one_rounding(actual, expected, what):
    err = (actual.double() - expected).abs()
    assert torch.all(err <= 2**-8 * expected.abs() + 1e-6), f"{what}: more than one rounding"


def _float32_buffers(rec):
    """Shapes of the float32 tensors allocated (not up-cast copies of operands)."""
    return [
        shape for op, dtype, shape in rec.allocations if dtype == torch.float32 and "copy" not in op
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_token_tile_writes_the_weight_gradient_directly(dtype):
    """Small N (one token tile covers every row): no float32 (vocab_tile x H) buffer; the GEMM
    writes each weight-gradient tile, summed in float32 and rounded once."""
    n_rows, vocab, hidden = 12, 96, 16
    rows, weight, fill, exp_rows, exp_weight = _gradient_problem(n_rows, vocab, hidden, dtype)
    tiles = Tiles(token_tile=n_rows, vocab_tile=32)
    with AllocationRecorder() as rec:
        grad_rows, grad_weight, _ = gradients.accumulate_gradients(
            rows, weight, None, fill, tiles=tiles, needs_grad=(True, True, False),
            acc_dtype=torch.float32, dlogits_dtype=dtype,
        )  # fmt: skip
    assert _float32_buffers(rec) == [(n_rows, hidden)]  # grad_rows' accumulator only
    assert grad_weight.dtype == grad_rows.dtype == dtype
    _within_one_rounding(grad_weight, exp_weight, "grad_weight")
    _within_one_rounding(grad_rows, exp_rows, "grad_rows")


def test_several_token_tiles_use_a_capped_float32_buffer():
    """Large N: the weight gradient sums over token tiles in a float32 buffer whose size stays
    under WEIGHT_BUFFER_BYTES (the vocabulary tile is narrowed to fit), rounded once at the end."""
    n_rows, vocab, hidden = 40, 100, 16
    rows, weight, fill, exp_rows, exp_weight = _gradient_problem(
        n_rows, vocab, hidden, torch.bfloat16
    )
    cap_rows = 24  # the buffer may hold 24 rows of H float32 values
    tiles = Tiles(token_tile=16, vocab_tile=64)
    with mock.patch.object(gradients, "WEIGHT_BUFFER_BYTES", cap_rows * hidden * 4):
        with AllocationRecorder() as rec:
            grad_rows, grad_weight, _ = gradients.accumulate_gradients(
                rows, weight, None, fill, tiles=tiles, needs_grad=(True, True, False),
                acc_dtype=torch.float32, dlogits_dtype=torch.bfloat16,
            )  # fmt: skip
    # grad_rows' accumulator and one weight buffer, at the cap (the tile asked for 64 columns).
    assert sorted(_float32_buffers(rec)) == [(cap_rows, hidden), (n_rows, hidden)]
    _within_one_rounding(grad_weight, exp_weight, "grad_weight")
    _within_one_rounding(grad_rows, exp_rows, "grad_rows")


def test_float32_gradients_accumulate_in_place_and_exactly():
    n_rows, vocab, hidden = 30, 70, 8
    rows, weight, fill, exp_rows, exp_weight = _gradient_problem(
        n_rows, vocab, hidden, torch.float32
    )
    grad_rows, grad_weight, _ = gradients.accumulate_gradients(
        rows, weight, None, fill, tiles=Tiles(token_tile=7, vocab_tile=16),
        needs_grad=(True, True, False), acc_dtype=torch.float32, dlogits_dtype=torch.float32,
    )  # fmt: skip
    reference.assert_close_rel(grad_rows, exp_rows, 1e-6, "grad_rows")
    reference.assert_close_rel(grad_weight, exp_weight, 1e-6, "grad_weight")


def test_a_vocabulary_tile_with_every_token_tile_skipped_has_zero_gradient():
    """With opt-in filtering a tile's GEMMs may all be skipped: its weight gradient is zero (the
    first GEMM would have overwritten the uninitialised buffer; none ran)."""
    n_rows, vocab, hidden = 10, 48, 8
    rows, weight, fill, _, _ = _gradient_problem(n_rows, vocab, hidden, torch.bfloat16)

    def skipping_fill(t0, t1, v0, v1):
        return None if v0 == 16 else fill(t0, t1, v0, v1)

    _, grad_weight, _ = gradients.accumulate_gradients(
        rows, weight, None, skipping_fill, tiles=Tiles(token_tile=4, vocab_tile=16),
        needs_grad=(False, True, False), acc_dtype=torch.float32, dlogits_dtype=torch.bfloat16,
    )  # fmt: skip
    assert torch.equal(grad_weight[16:32], torch.zeros(16, hidden, dtype=torch.bfloat16))
    assert grad_weight[:16].abs().sum() > 0 and grad_weight[32:].abs().sum() > 0


def test_factored_tiles_make_no_copy_of_the_weight_tile():
    """A float32 weight with 16-bit rows (the torch backend's mixed-dtype case): the factored
    tiles carry their own up-cast operands, so the loop makes no 16-bit copy of a weight tile that
    nothing would read; plain tiles (the Triton backend's) get one per vocabulary tile."""
    n_rows, vocab, hidden, vocab_tile = 12, 96, 16, 32
    rows = torch.randn(n_rows, hidden).bfloat16()
    weight = torch.randn(vocab, hidden)
    dlogits = torch.randn(n_rows, vocab)
    factor = torch.randn(n_rows)

    def factored(t0, t1, v0, v1):
        tile = dlogits[t0:t1, v0:v1]
        return gradients.FactoredTile(tile, factor[t0:t1], rows[t0:t1].float(), weight[v0:v1])

    def plain(t0, t1, v0, v1):
        return (factor[t0:t1, None] * dlogits[t0:t1, v0:v1]).bfloat16()

    def weight_copies(fill, dlogits_dtype):
        with AllocationRecorder() as rec:
            gradients.accumulate_gradients(
                rows, weight, None, fill, tiles=Tiles(token_tile=4, vocab_tile=vocab_tile),
                needs_grad=(True, True, False), acc_dtype=torch.float32,
                dlogits_dtype=dlogits_dtype,
            )  # fmt: skip
        return [
            shape
            for op, dtype, shape in rec.allocations
            if dtype == torch.bfloat16 and shape == (vocab_tile, hidden)
        ]

    assert weight_copies(factored, torch.float32) == []
    assert len(weight_copies(plain, torch.bfloat16)) == vocab // vocab_tile
