"""Masked vocabulary columns against the float64 reference, on both backends (Triton in the
interpreter on the CPU).

Masked vocabularies (padded tails, banned tokens, constrained-decoding heads) put ``-inf`` or a
large finite negative value in the bias: ``-1e30``, ``finfo(float32).min``, ``-1e9``. The online
log-sum-exp folds the logits piece by piece, so a mask matters where a piece starts: the first
column of a forward tile (the torch backend reads its tile's log-sum-exp off the first column),
the first block of a vocabulary split (the Triton forward's running max starts there), a backward
tile; and a piece that is masked whole. Every such place, every mask value, temperature, bias,
saved logits or not: values and the gradients of hidden states, weight and bias within 1e-5 of
the float64 reference (float32; relative to the largest reference value), never NaN. A row whose
every column is masked has no distribution: the call raises instead of returning NaN or a number.

Geometry (V = 150): torch vocabulary tiles of 64 columns ([0, 64), [64, 128), [128, 150)); Triton
blocks of 32 columns (the interpreter's config) in three vocabulary splits of 64 columns (forced:
the interpreter runs one split by default), and backward tiles of 64 columns.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from solopo_kernels import KernelOptions, fused_linear_logprobs
from solopo_kernels.checks import value_checks_disabled
from tests import reference
from tests.inputs import BACKENDS, IGNORE, skip_unless_backend_runs
from tests.instruments import expect_backend

# finfo.min * log2(e) overflows to -inf in the interpreter (numpy warns; the kernel means it).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

V, H = 150, 16
CHUNK = (8, 64)
SPLITS = 3
MASKS = {
    "-inf": -math.inf,
    "-1e30": -1e30,
    "finfo.min": torch.finfo(torch.float32).min,
    "-1e9": -1e9,
}
# Masked columns: every tile, block and split start; a whole tile; a whole split (the first); the
# last split and tile whole (a padded tail starting at a split edge); a tail starting mid-tile.
PATTERNS = {
    "piece_starts": [0, 32, 64, 96, 128],
    "whole_tile": list(range(64, 128)),
    "whole_split": list(range(0, 64)),
    "tail_split": list(range(128, 150)),
    "padded_tail": list(range(117, 150)),
}


def _splits():
    """Three vocabulary splits for the Triton forward (on a GPU the SM count decides)."""
    from solopo_kernels.ops import triton_tiles

    return mock.patch.object(triton_tiles, "_device_splits", lambda *args: SPLITS)


def _inputs(masked: list[int], mask: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, H, generator=generator).requires_grad_()
    weight = (torch.randn(V, H, generator=generator) * 0.5).requires_grad_()
    bias = torch.randn(V, generator=generator) * 0.5
    bias[masked] = mask
    bias.requires_grad_()
    allowed = torch.tensor(sorted(set(range(V)) - set(masked)))
    labels = allowed[torch.randint(0, len(allowed), (3, 9), generator=generator)]
    labels[0, :2] = IGNORE
    upstream = torch.randn(3, 9, generator=generator)
    return hidden, weight, bias, labels, upstream


def _run(backend, hidden, weight, bias, labels, upstream, temperature, options):
    with _splits(), expect_backend(backend):
        out = fused_linear_logprobs(
            hidden, weight, labels, bias, temperature=temperature, chunk_size=CHUNK,
            backend=backend, kernel_options=options,
        )  # fmt: skip
        grads = torch.autograd.grad((out * upstream).sum(), [hidden, weight, bias])
    return out, grads


def _reference(hidden, weight, bias, labels, upstream, temperature):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    out = reference.token_logps(*leaves[:2], labels, leaves[2], temperature=temperature)
    grads = torch.autograd.grad((out * upstream.double()).sum(), leaves)
    return out, grads


def _check(out, grads, expected, expected_grads, tol=1e-5):
    assert torch.isfinite(out).all(), "NaN or inf log-probs"
    reference.assert_close_rel(out, expected, tol, "log-probs")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert torch.isfinite(g).all(), f"non-finite grad {name}"
        reference.assert_close_rel(g, r, tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saved", ["recompute", "saved"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mask", list(MASKS))
def test_masked_columns_match_the_float64_reference(backend, saved, pattern, mask):
    skip_unless_backend_runs(backend)
    # finfo.min / 0.8 overflows to -inf: keep it finite at temperature 1 (-inf is its own case).
    temperature = 1.0 if mask == "finfo.min" else 0.8
    hidden, weight, bias, labels, upstream = _inputs(PATTERNS[pattern], MASKS[mask])
    n = int((labels != IGNORE).sum())
    options = KernelOptions(saved_logits_bytes=4 * n * V if saved == "saved" else 0)
    out, grads = _run(backend, hidden, weight, bias, labels, upstream, temperature, options)
    _check(out, grads, *_reference(hidden, weight, bias, labels, upstream, temperature))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["-1e30", "finfo.min", "-1e9"])
def test_the_review_case_a_large_negative_bias_at_tile_starts(backend, mask):
    """The case the review found (8.2 nats of error in the torch backend before the fix): a bias of
    ``mask`` at columns 0 and 256, ``chunk_size=(8, 256)``, V = 512."""
    skip_unless_backend_runs(backend)
    vocab = 512
    generator = torch.Generator().manual_seed(30)
    hidden = torch.randn(16, H, generator=generator).requires_grad_()
    weight = torch.randn(vocab, H, generator=generator).requires_grad_()
    bias = torch.zeros(vocab)
    bias[[0, 256]] = MASKS[mask]
    bias.requires_grad_()
    labels = torch.randint(1, 256, (16,), generator=generator)
    upstream = torch.randn(16, generator=generator)
    with expect_backend(backend):
        out = fused_linear_logprobs(
            hidden, weight, labels, bias, chunk_size=(8, 256), backend=backend,
            kernel_options=KernelOptions(saved_logits_bytes=0),
        )  # fmt: skip
        grads = torch.autograd.grad((out * upstream).sum(), [hidden, weight, bias])
    _check(out, grads, *_reference(hidden, weight, bias, labels, upstream, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["-1e30", "-1e9"])
def test_a_masked_target_gets_its_log_prob_and_a_finite_gradient(backend, mask):
    """A finite mask on the target itself: the log-prob is the (huge, negative) float64 one to
    float32 rounding, and the gradients stay finite."""
    skip_unless_backend_runs(backend)
    masked = PATTERNS["piece_starts"]
    hidden, weight, bias, labels, upstream = _inputs(masked, MASKS[mask], seed=1)
    labels[1, 3] = 64  # a masked column, at a tile and split start
    out, grads = _run(
        backend, hidden, weight, bias, labels, upstream, 1.0, KernelOptions(saved_logits_bytes=0)
    )
    expected, expected_grads = _reference(hidden, weight, bias, labels, upstream, 1.0)
    assert out[1, 3] < -1e8
    torch.testing.assert_close(out.double()[1, 3], expected[1, 3], rtol=1e-6, atol=0)
    keep = labels != labels[1, 3]
    reference.assert_close_rel(out[keep], expected[keep], 1e-5, "the other log-probs")
    for g, r in zip(grads, expected_grads):
        assert torch.isfinite(g).all()
        reference.assert_close_rel(g, r, 1e-5, "grads")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["-inf", "-1e30"])
def test_a_row_with_every_column_masked_raises(backend, mask):
    """No distribution: a ValueError that says so, not NaN (``-inf``) or a meaningless number (a
    finite mask) for that position."""
    skip_unless_backend_runs(backend)
    hidden, weight, bias, labels, upstream = _inputs([], 0.0)
    with torch.no_grad():
        bias.fill_(MASKS[mask])
    with pytest.raises(ValueError, match=r"logits: 25 response position\(s\).*every vocabulary"):
        _run(backend, hidden, weight, bias, labels, upstream, 1.0, None)
    with torch.no_grad(), pytest.raises(ValueError, match="no distribution"):
        fused_linear_logprobs(hidden, weight, labels, bias, backend=backend)
    with value_checks_disabled():  # the check is a value check: off with the others
        fused_linear_logprobs(
            hidden.detach(), weight.detach(), labels, bias.detach(), backend=backend
        )
