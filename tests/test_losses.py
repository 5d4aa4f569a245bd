"""The SoLoPO losses against the objective of docs/objective.md computed by hand in float64 on materialised logits.

Values and gradients (short and long hidden states, weight, bias) must match to a relative error
of 1e-5 for float32 inputs; every loss option combination runs on both backends.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from solopo_kernels import FusedSoLoPOLoss, fused_linear_logprobs, fused_solopo_loss, solopo_loss
from tests import reference
from tests.inputs import (
    BACKENDS,
    IGNORE,
    Head,
    float64_leaf,
    random_hidden,
    response_labels,
    skip_unless_backend_runs,
)
from tests.instruments import expect_backend, launch_totals

B, TS, TL, H, V = 2, 9, 15, 16, 80


def _cases():
    for loss_type, target, distance in itertools.product(
        ("dpo", "ipo", "simpo", "orpo", "cpo"), ("chosen", "both"), ("abs", "squared")
    ):
        for use_ref in (True, False) if loss_type in ("dpo", "ipo") else (True,):
            yield dict(
                loss_type=loss_type,
                ra_target=target,
                ra_distance=distance,
                ra_use_reference=use_ref,
            )
    yield dict(loss_type="dpo", label_smoothing=0.2)
    for loss_type in ("dpo", "ipo", "simpo", "orpo", "cpo"):
        yield dict(loss_type=loss_type, ra_gradient="long")
    yield dict(loss_type="dpo", ra_target="both", ra_use_reference=False, ra_gradient="long")
    yield dict(loss_type="simpo", ra_target="both", ra_distance="squared", ra_gradient="long")
    for loss_type in ("dpo", "ipo", "simpo", "orpo", "cpo"):
        yield dict(loss_type=loss_type, alpha=0.0)
    # The NLL term averaged over all chosen response tokens (TRL's CPO/ORPO cross-entropy mean).
    for loss_type in ("orpo", "cpo"):
        yield dict(loss_type=loss_type, nll_average="token")
        yield dict(loss_type=loss_type, ra_target="both", nll_average="token", alpha=0.0)


def _case_id(case):
    return "-".join(f"{v}" if isinstance(v, str) else f"{k}={v}" for k, v in case.items())


CASES = list(_cases())
BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "cpo": 0.1}


def _batch(ra_target: str, alpha: float):
    n_long = (2 if ra_target == "both" else 1) * B
    short_hidden = random_hidden(2 * B, TS, H)
    short_labels = response_labels(2 * B, TS, V)
    long_hidden = random_hidden(n_long, TL, H) if alpha > 0 else None
    long_labels = response_labels(n_long, TL, V) if alpha > 0 else None
    ref_short = -torch.rand(2 * B) * 20 - 1
    ref_long = -torch.rand(n_long) * 20 - 1
    return short_hidden, short_labels, long_hidden, long_labels, ref_short, ref_long


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_solopo_loss_matches_reference(case, backend):
    skip_unless_backend_runs(backend)
    options = {"beta": BETA[case["loss_type"]], "alpha": 0.7, "gamma": 0.3, **case}
    head = Head.random(V, H, bias=True)
    sh, sl, lh, ll, ref_s, ref_l = _batch(options.get("ra_target", "chosen"), options["alpha"])
    temperature = 0.8

    params = [sh, head.weight, head.bias] + ([lh] if options["alpha"] > 0 else [])
    with expect_backend(backend):
        out = fused_solopo_loss(
            head.weight,
            sh,
            sl,
            lh,
            ll,
            head.bias,
            ref_short_logps=ref_s,
            ref_long_logps=ref_l,
            temperature=temperature,
            backend=backend,
            **options,
        )
        grads = torch.autograd.grad(out.loss, params)

    ref_head = head.float64()
    ref_sh = float64_leaf(sh)
    s_logps, s_len = reference.sequence_logps(
        ref_sh, ref_head.weight, sl, ref_head.bias, temperature=temperature
    )
    ref_params = [ref_sh, ref_head.weight, ref_head.bias]
    l_logps = l_len = None
    if options["alpha"] > 0:
        ref_lh = float64_leaf(lh)
        l_logps, l_len = reference.sequence_logps(
            ref_lh, ref_head.weight, ll, ref_head.bias, temperature=temperature
        )
        ref_params.append(ref_lh)
    loss, preference, alignment = reference.solopo_objective(
        s_logps, s_len, l_logps, l_len, ref_short_logps=ref_s, ref_long_logps=ref_l, **options
    )

    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    reference.assert_close_rel(out.loss, loss, 1e-5, "loss")
    reference.assert_close_rel(out.preference_loss, preference, 1e-5, "preference_loss")
    if options["alpha"] > 0:
        reference.assert_close_rel(out.alignment_loss, alignment, 1e-5, "alignment_loss")
        reference.assert_close_rel(out.long_logps, l_logps, 1e-5, "long_logps")
    else:
        assert out.long_logps is None and float(out.alignment_loss) == 0.0
    reference.assert_close_rel(out.short_logps, s_logps, 1e-5, "short_logps")

    ref_grads = torch.autograd.grad(loss, ref_params)
    for name, g, r in zip(("short_hidden", "weight", "bias", "long_hidden"), grads, ref_grads):
        reference.assert_close_rel(g, r, 1e-5, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_bf16_loss_and_grads(loss_type, backend):
    """bfloat16 inputs (bias, temperature): loss within 1e-5 of the float64 reference on the same
    rounded inputs, gradients within 1e-2 (returned in bfloat16). Short and long rows go through
    the kernel in one call (on Triton: one forward launch)."""
    skip_unless_backend_runs(backend)
    options = {"loss_type": loss_type, "beta": BETA[loss_type], "alpha": 0.7}
    head = Head.random(V, H, bias=True, dtype=torch.bfloat16)
    sh, sl, lh, ll, ref_s, ref_l = _batch("chosen", 1.0)
    sh, lh = (x.detach().bfloat16().requires_grad_() for x in (sh, lh))
    params = [sh, head.weight, head.bias, lh]
    forward_launches = _triton_forward_launches()
    with expect_backend(backend):
        out = fused_solopo_loss(
            head.weight, sh, sl, lh, ll, head.bias, ref_short_logps=ref_s, ref_long_logps=ref_l,
            temperature=0.8, backend=backend, **options,
        )  # fmt: skip
        grads = torch.autograd.grad(out.loss, params)
    if backend == "triton":
        assert _triton_forward_launches() - forward_launches == 1
    ref_head, ref_sh, ref_lh = head.float64(), float64_leaf(sh), float64_leaf(lh)
    s = reference.sequence_logps(ref_sh, ref_head.weight, sl, ref_head.bias, temperature=0.8)
    lo = reference.sequence_logps(ref_lh, ref_head.weight, ll, ref_head.bias, temperature=0.8)
    loss, _, _ = reference.solopo_objective(
        *s, *lo, ref_short_logps=ref_s, ref_long_logps=ref_l, **options
    )
    reference.assert_close_rel(out.loss, loss, 1e-5, "loss")
    ref_grads = torch.autograd.grad(loss, [ref_sh, ref_head.weight, ref_head.bias, ref_lh])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        reference.assert_close_rel(g, r, 1e-2, "bf16 grad")


def _triton_forward_launches() -> int:
    return launch_totals()["forward"]


def test_metrics_names_and_values():
    head = Head.random(V, H, bias=False)
    sh, sl, lh, ll, ref_s, ref_l = _batch("both", 1.0)
    out = fused_solopo_loss(
        head.weight,
        sh,
        sl,
        lh,
        ll,
        ref_short_logps=ref_s,
        ref_long_logps=ref_l,
        ra_target="both",
        beta=0.5,
    )
    m = out.metrics
    expected_keys = {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "rewards/long_chosen",
        "solo_ra/distance",
        "logps/chosen",
        "logps/rejected",
        "logps/long_chosen",
        "rewards/long_rejected",
        "logps/long_rejected",
    }
    assert set(m) == expected_keys
    assert all(not v.requires_grad and v.shape == () for v in m.values())
    s_logps, _ = reference.sequence_logps(sh, head.weight, sl)
    l_logps, _ = reference.sequence_logps(lh, head.weight, ll)
    r_s = 0.5 * (s_logps - ref_s.double())
    r_l = 0.5 * (l_logps - ref_l.double())
    torch.testing.assert_close(m["rewards/chosen"].double(), r_s[:B].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        m["rewards/margins"].double(), (r_s[:B] - r_s[B:]).mean(), rtol=1e-5, atol=1e-6
    )
    assert float(m["rewards/accuracies"]) == float((r_s[:B] > r_s[B:]).double().mean())
    torch.testing.assert_close(
        m["rewards/long_chosen"].double(), r_l[:B].mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        m["solo_ra/distance"].double(), (r_s[:B] - r_l[:B]).abs().mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        m["logps/long_rejected"].double(), l_logps[B:].mean(), rtol=1e-5, atol=1e-6
    )


def test_one_pass_equals_separate_calls():
    head = Head.random(V, H, bias=True)
    sh, sl, lh, ll, _, _ = _batch("chosen", 1.0)
    out = fused_solopo_loss(
        head.weight, sh, sl, lh, ll, head.bias, loss_type="simpo", chunk_size=(4, 32)
    )
    short = fused_linear_logprobs(sh, head.weight, sl, head.bias, chunk_size=(4, 32)).sum(-1)
    long = fused_linear_logprobs(lh, head.weight, ll, head.bias, chunk_size=(4, 32)).sum(-1)
    torch.testing.assert_close(out.short_logps, short, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.long_logps, long, rtol=1e-6, atol=1e-5)
    assert torch.equal(out.short_lengths, (sl != IGNORE).sum(-1).float())


class _Untouchable(torch.Tensor):
    """A tensor that fails the test if any torch operation reads it (shape included)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"the long input was touched by {func}")


def test_alpha_zero_never_touches_the_long_input():
    head = Head.random(V, H, bias=False)
    sh, sl, _, _, ref_s, _ = _batch("chosen", 1.0)
    untouchable_hidden = torch.randn(B, TL, H).as_subclass(_Untouchable)
    untouchable_labels = torch.zeros(B, TL, dtype=torch.long).as_subclass(_Untouchable)
    with pytest.raises(AssertionError, match="touched"):
        untouchable_hidden.sum()  # the guard works
    out = fused_solopo_loss(
        head.weight,
        sh,
        sl,
        untouchable_hidden,
        untouchable_labels,
        alpha=0.0,
        ref_short_logps=ref_s,
    )
    without = fused_solopo_loss(head.weight, sh, sl, None, None, alpha=0.0, ref_short_logps=ref_s)
    assert torch.equal(out.loss, without.loss) and out.long_logps is None
    assert set(out.metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }


def test_solopo_loss_from_sums_equals_fused():
    head = Head.random(V, H, bias=False)
    sh, sl, lh, ll, _, _ = _batch("chosen", 1.0)
    fused = fused_solopo_loss(head.weight, sh, sl, lh, ll, loss_type="orpo", alpha=2.0)
    from_sums = solopo_loss(
        fused.short_logps,
        fused.short_lengths,
        fused.long_logps,
        fused.long_lengths,
        loss_type="orpo",
        alpha=2.0,
    )
    assert torch.equal(fused.loss, from_sums.loss)
    assert from_sums.metrics.keys() == fused.metrics.keys()


def test_module_form_equals_function():
    head = Head.random(V, H, bias=True)
    sh, sl, lh, ll, ref_s, ref_l = _batch("chosen", 1.0)
    sh.requires_grad_(True)
    options = dict(
        loss_type="ipo",
        beta=0.2,
        alpha=3.0,
        ra_distance="squared",
        ra_gradient="long",
        temperature=1.1,
    )
    refs = dict(ref_short_logps=ref_s, ref_long_logps=ref_l)
    module = FusedSoLoPOLoss(**options)
    out = module(head.weight, sh, sl, lh, ll, head.bias, **refs)
    expected = fused_solopo_loss(head.weight, sh, sl, lh, ll, head.bias, **options, **refs)
    assert torch.equal(out.loss, expected.loss)
    # ra_gradient leaves the value alone: the short-side gradient shows the module passed it on.
    (got,) = torch.autograd.grad(out.loss, sh)
    (want,) = torch.autograd.grad(expected.loss, sh)
    assert torch.equal(got, want)
    assert "ipo" in repr(module) and "ra_gradient='long'" in repr(module)


def test_the_nll_average_changes_only_the_nll_term_and_is_checked():
    """Token and sequence averages differ by the length weighting of the chosen responses alone
    (the logged nll_loss), and only orpo/cpo take the option."""
    head = Head.random(V, H, bias=False)
    sh, sl, lh, ll, _, _ = _batch("chosen", 1.0)
    out = {
        average: fused_solopo_loss(
            head.weight, sh, sl, lh, ll, loss_type="cpo", nll_average=average
        )
        for average in ("sequence", "token")
    }
    chosen, lengths = out["token"].chosen_logps.double(), out["token"].short_lengths[:B].double()
    assert lengths.unique().numel() > 1  # responses of different lengths, or the two agree
    torch.testing.assert_close(
        out["token"].metrics["nll_loss"].double(), -chosen.sum() / lengths.sum(), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        out["sequence"].metrics["nll_loss"].double(), -(chosen / lengths).mean(), rtol=1e-6, atol=0
    )
    gap = out["token"].metrics["nll_loss"] - out["sequence"].metrics["nll_loss"]
    torch.testing.assert_close(out["token"].loss - out["sequence"].loss, gap, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nll_average: only used by loss_type 'orpo' and 'cpo'"):
        fused_solopo_loss(head.weight, sh, sl, lh, ll, loss_type="simpo", nll_average="token")
    with pytest.raises(ValueError, match="nll_average"):
        fused_solopo_loss(head.weight, sh, sl, lh, ll, loss_type="orpo", nll_average="batch")


def test_the_options_pass_as_one_object_through_every_entry_point():
    """``options=SoLoPOOptions(...)`` gives what the loose keywords give, for the three entry
    points; both at once raise; the loose keywords' defaults are SoLoPOOptions' (which the
    both-at-once check relies on)."""
    import inspect
    from dataclasses import fields

    from solopo_kernels import SoLoPOOptions

    loose = dict(
        loss_type="dpo",
        beta=0.3,
        alpha=0.7,
        gamma=0.2,
        label_smoothing=0.1,
        ra_target="both",
        ra_distance="squared",
        ra_use_reference=False,
        ra_gradient="long",
        nll_average="sequence",
    )
    options = SoLoPOOptions(**loose)
    head = Head.random(V, H, bias=False)
    sh, sl, lh, ll, ref_s, ref_l = _batch("both", 1.0)
    refs = dict(ref_short_logps=ref_s, ref_long_logps=ref_l)
    by_keywords = fused_solopo_loss(head.weight, sh, sl, lh, ll, **loose, **refs)
    as_object = fused_solopo_loss(head.weight, sh, sl, lh, ll, options=options, **refs)
    assert torch.equal(by_keywords.loss, as_object.loss)
    sums = (as_object.short_logps, as_object.short_lengths, as_object.long_logps)
    sums += (as_object.long_lengths,)
    from_sums = solopo_loss(*sums, options=options, ref_short_logps=ref_s)
    assert torch.equal(from_sums.loss, solopo_loss(*sums, **loose, ref_short_logps=ref_s).loss)
    module = FusedSoLoPOLoss(options=options)
    assert module.options is options
    assert torch.equal(module(head.weight, sh, sl, lh, ll, **refs).loss, as_object.loss)
    for call in (
        lambda: fused_solopo_loss(head.weight, sh, sl, lh, ll, beta=0.3, options=options),
        lambda: solopo_loss(*sums, beta=0.3, options=options, ref_short_logps=ref_s),
        lambda: FusedSoLoPOLoss(beta=0.3, options=options),
    ):
        with pytest.raises(ValueError, match=r"options: given together with beta=0.3"):
            call()
    with pytest.raises(TypeError, match="options: expected a SoLoPOOptions or None, got dict"):
        solopo_loss(*sums, options=loose)
    defaults = {f.name: f.default for f in fields(SoLoPOOptions)}
    for entry in (solopo_loss, fused_solopo_loss, FusedSoLoPOLoss.__init__):
        parameters = inspect.signature(entry).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, entry


@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "orpo"])
@pytest.mark.parametrize("ra_target", ["chosen", "both"])
def test_ra_gradient_long_leaves_the_short_side_to_the_preference_loss(loss_type, ra_target):
    """With ``ra_gradient="long"`` the short sums get exactly the preference loss's gradient, the
    long sums exactly the gradient they get with ``"both"``, and the value is unchanged."""
    torch.manual_seed(3)
    n_long = (2 if ra_target == "both" else 1) * B
    sums = -torch.rand(2 * B, dtype=torch.float64) * 10 - 0.5
    lengths = torch.randint(2, 9, (2 * B,))
    long_sums = -torch.rand(n_long, dtype=torch.float64) * 30 - 0.5
    long_lengths = torch.randint(5, 20, (n_long,))
    refs = dict(ref_short_logps=-torch.rand(2 * B) * 10, ref_long_logps=-torch.rand(n_long) * 30)
    options = dict(loss_type=loss_type, beta=BETA[loss_type], alpha=2.5, ra_target=ra_target)

    def run(ra_gradient, part="loss"):
        short = sums.clone().requires_grad_(True)
        long = long_sums.clone().requires_grad_(True)
        out = solopo_loss(
            short, lengths, long, long_lengths, ra_gradient=ra_gradient, **refs, **options
        )
        value = getattr(out, part)
        grads = torch.autograd.grad(value, (short, long), allow_unused=True)
        return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (short, long))]

    out_long, (g_short, g_long) = run("long")
    out_both, (_, g_long_both) = run("both")
    _, (g_short_pref, _) = run("long", "preference_loss")
    assert torch.equal(out_long.loss, out_both.loss)
    assert torch.equal(g_short, g_short_pref)
    assert torch.equal(g_long, g_long_both)
    assert g_long.abs().min() > 0  # SoLo-RA really reaches every long row
    # and with "both" the short side feels SoLo-RA too (the option changes something)
    _, (g_short_both, _) = run("both")
    assert (g_short_both - g_short).abs().max() > 1e-3


def test_ra_gradient_is_checked():
    with pytest.raises(ValueError, match="ra_gradient"):
        solopo_loss(
            torch.zeros(2) - 1, torch.ones(2), None, None, loss_type="simpo", ra_gradient="short"
        )


def test_orpo_is_finite_when_a_response_is_certain():
    """A mean log-prob of exactly 0 must not give inf/NaN (log1mexp is clamped)."""
    short_logps = torch.tensor([0.0, -3.0], requires_grad=True)
    out = solopo_loss(short_logps, torch.tensor([2, 2]), None, None, loss_type="orpo", alpha=0.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(short_logps.grad).all()
