"""Bad input gets a TypeError/ValueError that names the argument (docs/api.md), never a NaN or an
out-of-bounds read."""

from __future__ import annotations

import pytest
import torch

from solopo_kernels import (
    FusedSoLoPOLoss,
    fused_linear_logprobs,
    fused_solopo_loss,
    solopo_loss,
    value_checks_disabled,
)
from tests.inputs import IGNORE, response_labels

B, TS, TL, H, V = 2, 6, 10, 8, 32


def good():
    """A valid fused_solopo_loss call's arguments; tests break one thing at a time."""
    return dict(
        weight=torch.randn(V, H),
        short_hidden=torch.randn(2 * B, TS, H),
        short_labels=response_labels(2 * B, TS, V),
        long_hidden=torch.randn(B, TL, H),
        long_labels=response_labels(B, TL, V),
        bias=torch.randn(V),
        ref_short_logps=-torch.rand(2 * B),
        ref_long_logps=-torch.rand(B),
    )


def call(**changes):
    kwargs = good()
    kwargs.update(changes)
    return fused_solopo_loss(**kwargs)


def test_good_call_works():
    assert torch.isfinite(call().loss)


@pytest.mark.parametrize(
    "changes, error, pattern",
    [
        (dict(weight=torch.randn(V, H + 1)), ValueError, r"short_hidden: .*H = 9"),
        (dict(weight=torch.randn(V)), ValueError, r"weight: .*\(V, H\)"),
        (dict(bias=torch.randn(V + 1)), ValueError, r"bias: .*\(V,\)"),
        (
            dict(short_hidden=torch.randn(3, TS, H), short_labels=response_labels(3, TS, V)),
            ValueError,
            r"short_hidden: .*even",
        ),
        (dict(short_hidden=torch.randn(2 * B, TS, H)[:, :, None]), ValueError, r"short_hidden"),
        (
            dict(short_labels=response_labels(2 * B, TS + 1, V)),
            ValueError,
            r"short_labels: expected shape \(4, 6\)",
        ),
        (
            dict(long_hidden=torch.randn(B + 1, TL, H), long_labels=response_labels(B + 1, TL, V)),
            ValueError,
            r"long_hidden: .*\(B, Tl, H\)",
        ),
        (dict(long_labels=response_labels(B, TL - 1, V)), ValueError, r"long_labels"),
        (dict(long_hidden=None), ValueError, r"long_hidden: required when alpha > 0"),
        (
            dict(short_labels=torch.full((2 * B, TS), V)),
            ValueError,
            r"short_labels: .*outside \[0, 32\)",
        ),
        (
            dict(long_labels=torch.full((B, TL), -3)),
            ValueError,
            r"long_labels: .*outside \[0, 32\)",
        ),
        (
            dict(
                short_labels=torch.cat(
                    [response_labels(2 * B - 1, TS, V), torch.full((1, TS), IGNORE)]
                )
            ),
            ValueError,
            r"short_labels: sequence\(s\) \[3\] have no response token",
        ),
        (dict(ref_short_logps=None), ValueError, r"ref_short_logps: required for loss_type='dpo'"),
        (
            dict(ref_short_logps=-torch.rand(B)),
            ValueError,
            r"ref_short_logps: expected shape \(2B,\)",
        ),
        (dict(ref_long_logps=None), ValueError, r"ref_long_logps: required"),
        (
            dict(ref_long_logps=-torch.rand(2 * B)),
            ValueError,
            r"ref_long_logps: expected shape \(B,\)",
        ),
        (
            dict(loss_type="kto"),
            ValueError,
            r"loss_type: expected one of 'dpo', 'ipo', 'simpo', 'orpo', 'cpo'",
        ),
        (dict(backend="cuda"), ValueError, r"backend: expected one of"),
        (dict(ra_target="rejected"), ValueError, r"ra_target"),
        (dict(ra_distance="softplus"), ValueError, r"ra_distance"),
        (dict(beta=0.0), ValueError, r"beta: expected a finite number > 0"),
        (dict(alpha=-1.0), ValueError, r"alpha: expected a finite number >= 0"),
        (dict(alpha=float("nan")), ValueError, r"alpha"),
        (dict(temperature=0.0), ValueError, r"temperature"),
        (dict(chunk_size=0), ValueError, r"chunk_size"),
        (dict(chunk_size=(4,)), ValueError, r"chunk_size"),
        (dict(label_smoothing=0.7), ValueError, r"label_smoothing"),
        (
            dict(loss_type="simpo", label_smoothing=0.1),
            ValueError,
            r"label_smoothing: only defined for loss_type='dpo'",
        ),
        (
            dict(short_labels=response_labels(2 * B, TS, V).float()),
            TypeError,
            r"short_labels: expected an integer tensor",
        ),
        (
            dict(short_hidden=torch.randn(2 * B, TS, H).double()),
            TypeError,
            r"short_hidden: expected the dtype of weight",
        ),
        (dict(weight=torch.randint(0, 3, (V, H))), TypeError, r"weight: expected a float32"),
        (dict(short_hidden=[[1.0]]), TypeError, r"short_hidden: expected a torch.Tensor"),
        (dict(ref_short_logps=-torch.rand(2 * B).long()), TypeError, r"ref_short_logps"),
        (dict(bias=torch.randn(V, device="meta")), ValueError, r"bias: expected a tensor on cpu"),
    ],
)
def test_fused_solopo_loss_rejects(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**changes)


def test_both_needs_two_long_rows_per_pair():
    with pytest.raises(ValueError, match=r"long_hidden: expected shape \(2B, Tl, H\)"):
        call(ra_target="both")
    with pytest.raises(ValueError, match=r"ref_long_logps: expected shape \(2B,\)"):
        call(
            ra_target="both",
            long_hidden=torch.randn(2 * B, TL, H),
            long_labels=response_labels(2 * B, TL, V),
        )


def test_reference_free_types_need_no_reference():
    for loss_type in ("simpo", "orpo", "cpo"):
        assert torch.isfinite(
            call(loss_type=loss_type, ref_short_logps=None, ref_long_logps=None).loss
        )
    # dpo without reference on the long side only needs ra_use_reference=False.
    assert torch.isfinite(call(ra_use_reference=False, ref_long_logps=None).loss)


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (
            (torch.randn(3, 4, 8), torch.randn(16, 9), response_labels(3, 4, 16)),
            ValueError,
            r"hidden: expected shape \(\.\.\., H\) with H = 9",
        ),
        (
            (torch.randn(3, 4, 8), torch.randn(16, 8), response_labels(3, 5, 16)),
            ValueError,
            r"labels: expected shape \(3, 4\)",
        ),
        (
            (torch.randn(3, 4, 8), torch.randn(16, 8), torch.full((3, 4), 16)),
            ValueError,
            r"labels: .*outside \[0, 16\)",
        ),
        (
            (torch.randn(3, 4, 8), torch.randn(16, 8).half(), response_labels(3, 4, 16)),
            TypeError,
            r"hidden: expected the dtype of weight",
        ),
        (
            (torch.randn(3, 4, 8), torch.randn(16, 8), torch.rand(3, 4)),
            TypeError,
            r"labels: expected an integer tensor",
        ),
    ],
)
def test_fused_linear_logprobs_rejects(args, error, pattern):
    with pytest.raises(error, match=pattern):
        fused_linear_logprobs(*args)


def test_solopo_loss_rejects():
    logps, lengths = -torch.rand(4) * 10, torch.tensor([3, 4, 5, 6])
    with pytest.raises(ValueError, match=r"short_logps: expected shape \(2B,\)"):
        solopo_loss(logps[:3], lengths[:3], None, None, alpha=0.0, loss_type="simpo")
    with pytest.raises(
        ValueError, match=r"short_lengths: every sequence needs at least one response token"
    ):
        solopo_loss(logps, torch.tensor([3, 0, 5, 6]), None, None, alpha=0.0, loss_type="simpo")
    with pytest.raises(ValueError, match=r"long_logps: required when alpha > 0"):
        solopo_loss(logps, lengths, None, None, loss_type="simpo")
    with pytest.raises(ValueError, match=r"long_lengths: expected shape \(B,\)"):
        solopo_loss(logps, lengths, logps[:2], lengths, loss_type="simpo")
    with pytest.raises(ValueError, match=r"long_lengths: every sequence"):
        solopo_loss(logps, lengths, logps[:2], torch.tensor([0, 1]), loss_type="simpo")


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="loss_type"):
        FusedSoLoPOLoss(loss_type="sigmoid")
    with pytest.raises(ValueError, match="backend"):
        FusedSoLoPOLoss(backend="cuda")


def test_value_checks_can_be_skipped_and_never_read_out_of_bounds(monkeypatch):
    hidden, weight = torch.randn(2, 5, 8), torch.randn(16, 8)
    labels = torch.tensor([[IGNORE, 3, 16, 1000, -7], [2, 4, IGNORE, 15, 0]])
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(hidden, weight, labels)
    with value_checks_disabled():
        out = fused_linear_logprobs(hidden, weight, labels)  # no check, no crash, no OOB read
    assert torch.isfinite(out).all()
    monkeypatch.setenv("SOLOPO_KERNELS_SKIP_VALUE_CHECKS", "1")
    assert torch.isfinite(fused_linear_logprobs(hidden, weight, labels)).all()
