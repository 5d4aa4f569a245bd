"""The float64 reference every kernel and loss is checked against.

It materialises the full ``[..., V]`` logits in float64, applies ``log_softmax`` and gathers the
labels, then writes the objective of docs/objective.md out formula by formula, independently of ``solopo_kernels.losses``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Per-token log-probs from materialised logits, 0 at ignored positions; differentiable in its
    inputs. Computed in float64 (``dtype`` picks another precision, e.g. a float32 baseline)."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    mask = labels != ignore_index
    picked = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    # where, not a product: an ignored position reads column 0, which may be masked (-inf).
    return torch.where(mask, picked, torch.zeros_like(picked))


def sequence_logps(hidden, weight, labels, bias=None, *, ignore_index=-100, temperature=1.0):
    """float64 ``(sums, lengths)`` per sequence (last dimension)."""
    tok = token_logps(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature
    )
    return tok.sum(-1), (labels != ignore_index).sum(-1).double()


def autocast_batch_logps(model, batch, *, prefix: str = "", dtype: torch.dtype = torch.bfloat16):
    """float64 ``(sums, lengths)`` of each row's completion tokens in a collated batch (the
    ``(B, T)`` tensors ``{prefix}input_ids``, ``{prefix}attention_mask`` and
    ``{prefix}completion_mask``; ``prefix="long_"`` for the long rows), computed as a
    mixed-precision run computes them: the model's body under CPU autocast, on the batch as given
    (16-bit results depend on the batch's shapes: on CPUs with bf16 units one hidden value can
    round differently in a padded row and in the row alone, which moves a loss as much as bf16
    itself does), then the head's inputs rounded to ``dtype`` as autocast rounds them and
    accumulated exactly (the kernels' contract: logits are never rounded to 16 bits)."""
    input_ids = batch[f"{prefix}input_ids"]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        body = model.model(
            input_ids=input_ids, attention_mask=batch[f"{prefix}attention_mask"], use_cache=False
        )
    completion = batch[f"{prefix}completion_mask"][:, 1:].bool()
    labels = input_ids[:, 1:].masked_fill(~completion, -100)
    hidden = body.last_hidden_state[:, :-1].to(dtype)
    return sequence_logps(hidden, model.lm_head.weight.detach().to(dtype), labels)


def solopo_objective(
    short_logps,
    short_lengths,
    long_logps,
    long_lengths,
    *,
    ref_short_logps=None,
    ref_long_logps=None,
    loss_type="dpo",
    beta=0.1,
    alpha=1.0,
    gamma=0.5,
    label_smoothing=0.0,
    ra_target="chosen",
    ra_distance="abs",
    ra_use_reference=True,
    ra_gradient="both",
    nll_average="sequence",
):
    """The objective of docs/objective.md in float64, pair by pair. Returns ``(loss, preference, alignment)``."""
    n = short_logps.shape[0] // 2
    s = short_logps.double()
    sl = short_lengths.double()

    def reward(logp, length, ref):
        if loss_type == "dpo":
            return beta * (logp - (ref if ref is not None else 0.0))
        if loss_type == "ipo":
            return beta * (logp / length - (ref / length if ref is not None else 0.0))
        if loss_type == "simpo":
            return beta * logp / length
        if loss_type == "orpo":
            m = logp / length
            return m - torch.log(1 - torch.exp(m))
        if loss_type == "cpo":
            return beta * logp
        raise AssertionError(loss_type)

    prefs, aligns = [], []
    for i in range(n):
        rs = ref_short_logps.double() if ref_short_logps is not None else None
        r_w = reward(s[i], sl[i], rs[i] if rs is not None else None)
        r_l = reward(s[n + i], sl[n + i], rs[n + i] if rs is not None else None)
        d = r_w - r_l
        if loss_type == "dpo":
            pref = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
        elif loss_type == "ipo":
            pref = (d / beta - 1 / (2 * beta)) ** 2
        elif loss_type == "simpo":
            pref = -F.logsigmoid(d - gamma)
        elif loss_type == "orpo":
            pref = -beta * F.logsigmoid(d)
        else:
            pref = -F.logsigmoid(d)
        if loss_type in ("orpo", "cpo") and nll_average == "sequence":
            pref = pref - s[i] / sl[i]  # the response's token mean, averaged over pairs below
        prefs.append(pref)
        if alpha > 0:
            use_ref = ra_use_reference and loss_type in ("dpo", "ipo")
            rows = [i] if ra_target == "chosen" else [i, n + i]
            total = 0.0
            for k, row in enumerate(rows):
                short_row = i if k == 0 else n + i
                rs_ra = reward(s[short_row], sl[short_row], rs[short_row] if use_ref else None)
                if ra_gradient == "long":
                    rs_ra = rs_ra.detach()
                long_row = row if ra_target == "both" else i
                rl_ra = reward(
                    long_logps.double()[long_row],
                    long_lengths.double()[long_row],
                    ref_long_logps.double()[long_row] if use_ref else None,
                )
                gap = rs_ra - rl_ra
                total = total + (gap.abs() if ra_distance == "abs" else gap**2)
            aligns.append(total)
    preference = torch.stack(prefs).mean()
    if loss_type in ("orpo", "cpo") and nll_average == "token":
        # every chosen response token of the batch weighs the same (TRL's cross-entropy mean)
        preference = preference - s[:n].sum() / sl[:n].sum()
    alignment = torch.stack(aligns).mean() if aligns else torch.zeros((), dtype=torch.float64)
    return preference + alpha * alignment, preference, alignment


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (a norm-wise relative error); NaN fails."""
    actual = actual.double()
    expected = expected.double()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close_rel(actual, expected, rel: float, what: str = "") -> None:
    err = max_relative_error(actual, expected)
    assert err <= rel and not math.isnan(err), f"{what}: relative error {err:.3g} > {rel:.1g}"
