"""The SoLoPO objective (docs/objective.md): rewards, preference losses and short-to-long reward alignment.

Data flow: per-token log-probs (``solopo_kernels.ops``) -> per-sequence sums and response lengths
-> rewards -> preference loss on the short pair + ``alpha`` x SoLo-RA distance between the short
and long rewards of the same response. :func:`solopo_loss` starts from per-sequence sums (for
trainers that get log-probs elsewhere); :func:`fused_solopo_loss` starts from hidden states and
runs the fused log-prob kernel once over the short and long response rows together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import (
    check_choice,
    check_float,
    check_labels_and_lengths,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from .context_parallel import group_size, sum_over_group
from .ops.logprobs import (
    BACKENDS,
    ChunkSize,
    check_chunk_size,
    check_head,
    check_hidden_and_labels,
    resolve_backend,
    response_logprobs,
    response_positions,
    scatter_to_positions,
)
from .ops.tiles import KernelOptions, check_kernel_options

LOSS_TYPES = ("dpo", "ipo", "simpo", "orpo", "cpo")
REFERENCE_LOSS_TYPES = ("dpo", "ipo")
RA_TARGETS = ("chosen", "both")
RA_DISTANCES = ("abs", "squared")
RA_GRADIENTS = ("both", "long")
NLL_AVERAGES = ("sequence", "token")
NLL_LOSS_TYPES = ("orpo", "cpo")


@dataclass(frozen=True)
class SoLoPOOptions:
    """The loss options of the SoLoPO objective (docs/objective.md), checked on construction.

    Attributes:
        loss_type: ``"dpo"``, ``"ipo"``, ``"simpo"``, ``"orpo"`` or ``"cpo"`` (reward and
            preference loss; see docs/objective.md).
        beta: reward scale (> 0); for ``orpo`` the weight of the odds-ratio term.
        alpha: weight of the SoLo-RA term (>= 0); 0 disables all long-input work.
        gamma: SimPO target margin.
        label_smoothing: DPO's conservative label smoothing ``eps`` in ``[0, 0.5]`` (dpo only).
        ra_target: ``"chosen"`` aligns the chosen response only (the paper's default);
            ``"both"`` also aligns the rejected one.
        ra_distance: ``"abs"`` (``|u|``, default) or ``"squared"`` (``u**2``).
        ra_use_reference: for dpo/ipo, whether the SoLo-RA rewards keep the reference terms;
            ``False`` drops them there (no reference forward on the long input needed).
        ra_gradient: ``"both"`` (the paper's formula, default): SoLo-RA's gradient reaches the
            short-side and the long-side rewards; ``"long"``: the short-side reward inside
            SoLo-RA is a fixed target (detached), so SoLo-RA moves only the long side and the
            short side gets exactly the preference loss's gradient. Not in the paper; see
            docs/objective.md for why it exists.
        nll_average: orpo/cpo, how the negative log-likelihood term on the chosen responses is
            averaged: ``"sequence"`` (default, the ORPO paper's ``-mean_i mlogp_i``: each
            response's token mean, then the mean over pairs) or ``"token"`` (``-sum_i logp_i /
            sum_i n_i``: over all chosen response tokens of the batch, as TRL's CPOTrainer and
            ORPOTrainer average their cross-entropy; longer responses weigh more).
    """

    loss_type: str = "dpo"
    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 0.5
    label_smoothing: float = 0.0
    ra_target: str = "chosen"
    ra_distance: str = "abs"
    ra_use_reference: bool = True
    ra_gradient: str = "both"
    nll_average: str = "sequence"

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("ra_target", self.ra_target, RA_TARGETS)
        check_choice("ra_distance", self.ra_distance, RA_DISTANCES)
        check_choice("ra_gradient", self.ra_gradient, RA_GRADIENTS)
        check_positive("beta", self.beta)
        check_positive("alpha", self.alpha, allow_zero=True)
        if (
            isinstance(self.gamma, bool)
            or not isinstance(self.gamma, (int, float))
            or not math.isfinite(self.gamma)
        ):
            raise ValueError(f"gamma: expected a finite number, got {self.gamma!r}")
        check_positive("label_smoothing", self.label_smoothing, allow_zero=True)
        if self.label_smoothing > 0.5:
            raise ValueError(
                f"label_smoothing: expected a value in [0, 0.5], got {self.label_smoothing}"
            )
        if self.label_smoothing and self.loss_type != "dpo":
            raise ValueError(
                f"label_smoothing: only defined for loss_type='dpo', got {self.label_smoothing} "
                f"with loss_type={self.loss_type!r}"
            )
        if not isinstance(self.ra_use_reference, bool):
            raise TypeError(
                f"ra_use_reference: expected a bool, got {type(self.ra_use_reference).__name__}"
            )
        check_choice("nll_average", self.nll_average, NLL_AVERAGES)
        if self.nll_average != "sequence" and self.loss_type not in NLL_LOSS_TYPES:
            raise ValueError(
                f"nll_average: only used by loss_type 'orpo' and 'cpo' (their NLL term), got "
                f"{self.nll_average!r} with loss_type={self.loss_type!r}"
            )

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`solopo_loss` / :func:`fused_solopo_loss`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def uses_long(self) -> bool:
        """The long input is read only when the SoLo-RA term has weight."""
        return self.alpha > 0

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in REFERENCE_LOSS_TYPES

    @property
    def needs_long_reference(self) -> bool:
        return self.needs_reference and self.uses_long and self.ra_use_reference

    @property
    def long_rows_per_pair(self) -> int:
        return 2 if self.ra_target == "both" else 1


def _call_options(options: SoLoPOOptions | None, **keywords: Any) -> SoLoPOOptions:
    """The loss options of one call, built once at the edge: ``options`` itself when given, else a
    :class:`SoLoPOOptions` built **by name** from the loose ``keywords`` (by position, two options
    of one type could trade places and pass every check). Loose keywords that differ from their
    defaults next to ``options`` raise ``ValueError``: one call, one source of options."""
    if options is None:
        return SoLoPOOptions(**keywords)
    if not isinstance(options, SoLoPOOptions):
        raise TypeError(f"options: expected a SoLoPOOptions or None, got {type(options).__name__}")
    defaults = SoLoPOOptions()
    both = [name for name, value in keywords.items() if value != getattr(defaults, name)]
    if both:
        raise ValueError(
            f"options: given together with {both[0]}={keywords[both[0]]!r}; pass the loss options "
            "either as one SoLoPOOptions or as keywords, not both"
        )
    return options


@dataclass
class SoLoPOOutput:
    """What the SoLoPO losses return.

    Attributes:
        loss: scalar float32, ``preference_loss + alpha * alignment_loss``; backpropagate this.
        preference_loss: scalar, the mean over pairs of the short-context preference loss.
        alignment_loss: scalar, the mean over pairs of the SoLo-RA distance (0 when alpha == 0).
        short_logps: ``(2B,)`` per-sequence sums of response-token log-probs, chosen rows first.
        short_lengths: ``(2B,)`` response-token counts.
        long_logps: ``(B,)`` (``ra_target="chosen"``) or ``(2B,)`` sums on the long input, or
            None when alpha == 0.
        long_lengths: same shape as ``long_logps``, or None.
        metrics: detached scalars named like TRL's: ``rewards/chosen``, ``rewards/rejected``,
            ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` and,
            when alpha > 0, ``rewards/long_chosen``, ``solo_ra/distance`` (mean ``|r(x_s, y_w) -
            r(x_l, y_w)|`` of the rewards inside SoLo-RA), ``logps/long_chosen`` (plus
            ``rewards/long_rejected`` and ``logps/long_rejected`` for ``ra_target="both"``);
            orpo/cpo also ``nll_loss`` (the NLL term inside ``preference_loss``).
    """

    loss: torch.Tensor
    preference_loss: torch.Tensor
    alignment_loss: torch.Tensor
    short_logps: torch.Tensor
    short_lengths: torch.Tensor
    long_logps: torch.Tensor | None
    long_lengths: torch.Tensor | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.short_logps[: self.short_logps.shape[0] // 2]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.short_logps[self.short_logps.shape[0] // 2 :]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends, with finite gradients.

    ``x`` is clamped to ``<= -1e-30`` (a mean log-prob of exactly 0 would give ``-inf``); each
    branch is evaluated only where it is used, so no NaN leaks through ``torch.where``.
    """
    x = x.clamp(max=-1e-30)
    near_zero = x > -math.log(2.0)
    split = torch.full_like(x, -math.log(2.0))
    upper = torch.log(-torch.expm1(torch.where(near_zero, x, split)))
    lower = torch.log1p(-torch.exp(torch.where(near_zero, split, x)))
    return torch.where(near_zero, upper, lower)


def rewards(
    options: SoLoPOOptions,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None,
) -> torch.Tensor:
    """The reward ``r(x, y)`` of ``options.loss_type`` per sequence, in float32 or wider.

    ``logps``/``ref_logps`` are per-sequence sums and ``lengths`` response-token counts;
    ``ref_logps=None`` drops the reference term (reference-free types ignore it).
    """
    mean = logps / lengths
    beta = options.beta
    if options.loss_type == "dpo":
        return beta * (logps - ref_logps) if ref_logps is not None else beta * logps
    if options.loss_type == "ipo":
        return beta * (mean - ref_logps / lengths) if ref_logps is not None else beta * mean
    if options.loss_type == "simpo":
        return beta * mean
    if options.loss_type == "orpo":
        return mean - log1mexp(mean)
    return beta * logps  # cpo


def preference_losses(
    options: SoLoPOOptions,
    chosen_reward: torch.Tensor,
    rejected_reward: torch.Tensor,
) -> torch.Tensor:
    """Per-pair preference loss of ``options.loss_type`` with ``D = r(x_s, y_w) - r(x_s, y_l)``,
    without the orpo/cpo NLL term (:func:`nll_loss`, a batch average)."""
    margin = chosen_reward - rejected_reward
    beta = options.beta
    if options.loss_type == "dpo":
        eps = options.label_smoothing
        return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    if options.loss_type == "ipo":
        return (margin / beta - 1 / (2 * beta)) ** 2
    if options.loss_type == "simpo":
        return -F.logsigmoid(margin - options.gamma)
    if options.loss_type == "orpo":
        return -beta * F.logsigmoid(margin)
    return -F.logsigmoid(margin)  # cpo


def nll_loss(
    options: SoLoPOOptions, chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor
) -> torch.Tensor | None:
    """The orpo/cpo negative log-likelihood of the chosen responses on the short input (a
    scalar), averaged as ``options.nll_average`` says, from their ``(B,)`` sums and token counts;
    None for the other loss types."""
    if options.loss_type not in NLL_LOSS_TYPES:
        return None
    if options.nll_average == "token":
        return -chosen_logps.sum() / chosen_lengths.sum()
    return -(chosen_logps / chosen_lengths).mean()


def _distance(options: SoLoPOOptions, gap: torch.Tensor) -> torch.Tensor:
    return gap.abs() if options.ra_distance == "abs" else gap.square()


def _objective(
    options: SoLoPOOptions,
    short_logps: torch.Tensor,
    short_lengths: torch.Tensor,
    long_logps: torch.Tensor | None,
    long_lengths: torch.Tensor | None,
    ref_short_logps: torch.Tensor | None,
    ref_long_logps: torch.Tensor | None,
) -> SoLoPOOutput:
    """The objective (docs/objective.md) on checked per-sequence tensors (float32 or wider)."""
    short_logps = short_logps.float() if short_logps.dtype != torch.float64 else short_logps
    acc = short_logps.dtype
    short_lengths = short_lengths.to(acc)
    ref_short = ref_short_logps.to(acc) if options.needs_reference else None
    n_pairs = short_logps.shape[0] // 2

    short_rewards = rewards(options, short_logps, short_lengths, ref_short)
    chosen_reward, rejected_reward = short_rewards[:n_pairs], short_rewards[n_pairs:]
    preference = preference_losses(options, chosen_reward, rejected_reward).mean()
    nll = nll_loss(options, short_logps[:n_pairs], short_lengths[:n_pairs])
    if nll is not None:
        preference = preference + nll

    margin = (chosen_reward - rejected_reward).detach()
    metrics = {
        "rewards/chosen": chosen_reward.detach().mean(),
        "rewards/rejected": rejected_reward.detach().mean(),
        "rewards/margins": margin.mean(),
        "rewards/accuracies": (margin > 0).to(acc).mean(),
        "logps/chosen": short_logps[:n_pairs].detach().mean(),
        "logps/rejected": short_logps[n_pairs:].detach().mean(),
    }
    if nll is not None:
        metrics["nll_loss"] = nll.detach()

    if not options.uses_long:
        alignment = torch.zeros((), dtype=acc, device=short_logps.device)
        return SoLoPOOutput(
            preference, preference, alignment, short_logps, short_lengths, None, None, metrics
        )

    long_logps = long_logps.to(acc)
    long_lengths = long_lengths.to(acc)
    n_long = long_logps.shape[0]
    use_ref = options.needs_reference and options.ra_use_reference
    # The short-side rewards inside SoLo-RA drop the reference terms when ra_use_reference=False.
    short_ra = (
        short_rewards
        if use_ref or not options.needs_reference
        else rewards(options, short_logps, short_lengths, None)
    )
    long_ra = rewards(
        options, long_logps, long_lengths, ref_long_logps.to(acc) if use_ref else None
    )
    short_target = short_ra[:n_long]
    if options.ra_gradient == "long":
        # A fixed target: SoLo-RA pulls the long side toward the short one and never pushes the
        # short side down (the cheap way to shrink the gap when the long side cannot rise).
        short_target = short_target.detach()
    gap = short_target - long_ra
    per_row = _distance(options, gap)
    # "both": chosen and rejected terms are summed per pair, then averaged over pairs.
    alignment = per_row.view(options.long_rows_per_pair, n_pairs).sum(0).mean()

    metrics["rewards/long_chosen"] = long_ra[:n_pairs].detach().mean()
    metrics["solo_ra/distance"] = gap[:n_pairs].detach().abs().mean()
    metrics["logps/long_chosen"] = long_logps[:n_pairs].detach().mean()
    if options.ra_target == "both":
        metrics["rewards/long_rejected"] = long_ra[n_pairs:].detach().mean()
        metrics["logps/long_rejected"] = long_logps[n_pairs:].detach().mean()

    loss = preference + options.alpha * alignment
    return SoLoPOOutput(
        loss, preference, alignment, short_logps, short_lengths, long_logps, long_lengths, metrics
    )


def _check_sequence_vector(
    name: str, value: object, size: int, meaning: str, reference: torch.Tensor
) -> torch.Tensor:
    tensor = check_tensor(name, value)
    check_shape(name, tensor, (size,), meaning)
    check_same_device("short inputs", reference, **{name: tensor})
    return tensor


def _check_references(
    options: SoLoPOOptions,
    ref_short_logps: object,
    ref_long_logps: object,
    n_pairs: int,
    reference: torch.Tensor,
) -> None:
    if not options.needs_reference:
        return
    if ref_short_logps is None:
        raise ValueError(
            f"ref_short_logps: required for loss_type={options.loss_type!r}: the reference model's "
            f"per-sequence log-prob sums of shape (2B,) = ({2 * n_pairs},)"
        )
    check_float(
        "ref_short_logps",
        _check_sequence_vector("ref_short_logps", ref_short_logps, 2 * n_pairs, "(2B,)", reference),
    )
    if options.needs_long_reference:
        n_long = options.long_rows_per_pair * n_pairs
        meaning = "(B,)" if n_long == n_pairs else "(2B,)"
        if ref_long_logps is None:
            raise ValueError(
                f"ref_long_logps: required for loss_type={options.loss_type!r} with alpha > 0 and "
                f"ra_use_reference=True: reference log-prob sums on the long input of shape "
                f"{meaning} = ({n_long},) (or pass ra_use_reference=False)"
            )
        check_float(
            "ref_long_logps",
            _check_sequence_vector("ref_long_logps", ref_long_logps, n_long, meaning, reference),
        )


def solopo_loss(
    short_logps: torch.Tensor,
    short_lengths: torch.Tensor,
    long_logps: torch.Tensor | None,
    long_lengths: torch.Tensor | None,
    *,
    ref_short_logps: torch.Tensor | None = None,
    ref_long_logps: torch.Tensor | None = None,
    loss_type: str = "dpo",
    beta: float = 0.1,
    alpha: float = 1.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    ra_target: str = "chosen",
    ra_distance: str = "abs",
    ra_use_reference: bool = True,
    ra_gradient: str = "both",
    nll_average: str = "sequence",
    context_parallel_group: Any = None,
    options: SoLoPOOptions | None = None,
) -> SoLoPOOutput:
    """The SoLoPO objective from per-sequence sums of response-token log-probs.

    Args:
        short_logps: ``(2B,)`` sums on ``x_short``: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.
        short_lengths: ``(2B,)`` response-token counts (> 0).
        long_logps: sums on ``x_long``: ``(B,)`` chosen for ``ra_target="chosen"``, ``(2B,)``
            (chosen first) for ``"both"``; may be None when ``alpha == 0`` (then never read).
        long_lengths: counts for ``long_logps``.
        ref_short_logps / ref_long_logps: reference sums of the same shapes; required for
            dpo/ipo (the long one only when alpha > 0 and ``ra_use_reference``).
        context_parallel_group: a ``torch.distributed`` process group when the sequences are
            split along their length over its ranks (see :mod:`solopo_kernels.context_parallel`):
            then ``short_logps``, ``short_lengths``, ``long_logps`` and ``long_lengths`` are this
            rank's *partial* sums and counts (its slice's response tokens; 0 where it holds none),
            all-reduced here; every rank gets the same loss. The ``ref_*`` sums are the full ones.
        Other options: see :class:`SoLoPOOptions`; or pass them as one ``options=``
            :class:`SoLoPOOptions` (then leave the loose ones at their defaults).
    Returns:
        :class:`SoLoPOOutput`.
    """
    options = _call_options(
        options,
        loss_type=loss_type,
        beta=beta,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        ra_target=ra_target,
        ra_distance=ra_distance,
        ra_use_reference=ra_use_reference,
        ra_gradient=ra_gradient,
        nll_average=nll_average,
    )
    short_logps = check_tensor("short_logps", short_logps)
    check_float("short_logps", short_logps)
    if short_logps.dim() != 1 or short_logps.shape[0] == 0 or short_logps.shape[0] % 2:
        raise ValueError(
            f"short_logps: expected shape (2B,) with chosen rows first (an even, non-zero length), "
            f"got {tuple(short_logps.shape)}"
        )
    n_pairs = short_logps.shape[0] // 2
    _check_sequence_vector("short_lengths", short_lengths, 2 * n_pairs, "(2B,)", short_logps)
    lengths_to_check = [("short_lengths", short_lengths)]
    if options.uses_long:
        n_long = options.long_rows_per_pair * n_pairs
        meaning = "(B,)" if n_long == n_pairs else "(2B,)"
        if long_logps is None or long_lengths is None:
            raise ValueError(
                f"long_logps: required when alpha > 0 (got alpha={options.alpha}): long-input sums of shape "
                f"{meaning} = ({n_long},) with their long_lengths; pass alpha=0 to train without SoLo-RA"
            )
        check_float(
            "long_logps",
            _check_sequence_vector("long_logps", long_logps, n_long, meaning, short_logps),
        )
        _check_sequence_vector("long_lengths", long_lengths, n_long, meaning, short_logps)
        lengths_to_check.append(("long_lengths", long_lengths))
    _check_references(options, ref_short_logps, ref_long_logps, n_pairs, short_logps)
    return _reduce_and_score(
        options,
        [short_logps, long_logps if options.uses_long else None],
        [short_lengths, long_lengths if options.uses_long else None],
        ref_short_logps,
        ref_long_logps,
        context_parallel_group,
    )


def _reduce_and_score(
    options: SoLoPOOptions,
    sums: list[torch.Tensor | None],
    lengths: list[torch.Tensor | None],
    ref_short_logps: torch.Tensor | None,
    ref_long_logps: torch.Tensor | None,
    group: Any,
    bad_labels: torch.Tensor | None = None,
) -> SoLoPOOutput:
    """All-reduce partial sums and counts over ``group`` (when given), check every sequence has a
    response token, and compute the objective. ``sums``/``lengths`` are ``[short, long]`` (long
    None with alpha = 0). ``bad_labels`` (a count of out-of-range labels on this rank) joins the
    all-reduce, so that every rank raises the same error instead of leaving the others waiting in
    a collective."""
    names = ["short_lengths", "long_lengths"]
    present = [i for i, t in enumerate(sums) if t is not None]
    if group is not None:
        group_size(group)  # a clear error for a group that is not one
        counts = torch.cat([lengths[i].to(torch.long) for i in present])
        if bad_labels is not None:
            counts = torch.cat([counts, bad_labels.to(torch.long).reshape(1)])
        # Partial sums are float32 (the kernel's output); counts are exact integers.
        total_sums = sum_over_group(torch.cat([sums[i] for i in present]), group)
        total_counts = counts.clone()
        torch.distributed.all_reduce(total_counts, group=group)
        if bad_labels is not None:
            bad_labels, total_counts = total_counts[-1], total_counts[:-1]
        split = [sums[i].shape[0] for i in present]
        for i, s, n in zip(
            present, total_sums.split(split), total_counts.split(split), strict=True
        ):
            sums[i], lengths[i] = s, n
    if value_checks_enabled():  # one host sync for all count vectors
        flags = [(lengths[i] <= 0).any() for i in present]
        if bad_labels is not None:
            flags.append(bad_labels > 0)
        values = torch.stack(flags).tolist()
        if bad_labels is not None and values[-1]:
            raise ValueError(
                f"labels: {int(bad_labels)} label(s) outside [0, V) that are not ignore_index, on "
                "the ranks of context_parallel_group; labels must be token ids of the lm_head vocabulary"
            )
        for i, has_empty in zip(present, values, strict=False):
            if has_empty:
                where = " on any rank of context_parallel_group" if group is not None else ""
                rows = (lengths[i] <= 0).nonzero().flatten().tolist()
                raise ValueError(
                    f"{names[i]}: every sequence needs at least one response token (counts must be "
                    f"> 0); sequence(s) {rows} have none{where}"
                )
    return _objective(
        options, sums[0], lengths[0], sums[1], lengths[1], ref_short_logps, ref_long_logps
    )


def fused_solopo_loss(
    weight: torch.Tensor,
    short_hidden: torch.Tensor,
    short_labels: torch.Tensor,
    long_hidden: torch.Tensor | None,
    long_labels: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    loss_type: str = "dpo",
    beta: float = 0.1,
    alpha: float = 1.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    ref_short_logps: torch.Tensor | None = None,
    ref_long_logps: torch.Tensor | None = None,
    ra_target: str = "chosen",
    ra_distance: str = "abs",
    ra_use_reference: bool = True,
    ra_gradient: str = "both",
    nll_average: str = "sequence",
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: ChunkSize = None,
    backend: str = "auto",
    kernel_options: KernelOptions | None = None,
    context_parallel_group: Any = None,
    options: SoLoPOOptions | None = None,
) -> SoLoPOOutput:
    """The SoLoPO loss from last hidden states and the lm_head weight, without ``[T x V]`` logits.

    Args:
        weight: ``(V, H)`` lm_head weight; ``bias``: ``(V,)`` or None.
        short_hidden: ``(2B, Ts, H)``: rows ``[0, B)`` are ``x_short + y_w``, ``[B, 2B)`` are
            ``x_short + y_l``. Same float dtype as ``weight``.
        short_labels: ``(2B, Ts)`` shifted labels, ``ignore_index`` outside the responses.
        long_hidden: ``(B, Tl, H)`` (``x_long + y_w``) for ``ra_target="chosen"``, ``(2B, Tl, H)``
            (chosen rows first) for ``"both"``; None allowed (and never read) when alpha == 0.
        long_labels: ``(B, Tl)`` or ``(2B, Tl)``.
        ref_short_logps / ref_long_logps: reference per-sequence sums (see :func:`solopo_loss`).
        ignore_index, temperature, chunk_size, backend, kernel_options: as in
            ``fused_linear_logprobs``.
        context_parallel_group: a ``torch.distributed`` process group over whose ranks every row
            is split along its length (see :mod:`solopo_kernels.context_parallel`): the hidden
            states and the *already shifted* labels are this rank's slice of each row (any order:
            contiguous or head+tail; padding labelled ``ignore_index``). The per-sequence sums and
            counts are all-reduced over the group and every rank returns the same loss; each
            rank's hidden-state gradients are its slices of the unsplit ones, and the ``weight``/
            ``bias`` gradients summed over the group are the unsplit ones. A row may have no
            response token on some rank, but needs one somewhere in the group. The ``ref_*`` sums
            are the full ones.
        Other options: see :class:`SoLoPOOptions`; or pass them as one ``options=``
            :class:`SoLoPOOptions` (then leave the loose ones at their defaults).
    Returns:
        :class:`SoLoPOOutput`; ``loss`` is differentiable in the hidden states, weight and bias.

    Short and long response rows are gathered into one row set and go through the kernel in one
    call (one pass over the weight); the result equals two separate calls.
    """
    options = _call_options(
        options,
        loss_type=loss_type,
        beta=beta,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        ra_target=ra_target,
        ra_distance=ra_distance,
        ra_use_reference=ra_use_reference,
        ra_gradient=ra_gradient,
        nll_average=nll_average,
    )
    vocab, _ = check_head(weight, bias)
    check_hidden_and_labels("short_hidden", short_hidden, "short_labels", short_labels, weight)
    if short_hidden.dim() != 3 or short_hidden.shape[0] == 0 or short_hidden.shape[0] % 2:
        raise ValueError(
            "short_hidden: expected shape (2B, Ts, H) with an even, non-zero batch (chosen rows "
            f"first, then rejected), got {tuple(short_hidden.shape)}"
        )
    n_pairs = short_hidden.shape[0] // 2
    labels_to_check = [("short_labels", short_labels)]
    if options.uses_long:  # with alpha == 0 the long tensors are not even looked at
        n_long = options.long_rows_per_pair * n_pairs
        meaning = f"({'B' if n_long == n_pairs else '2B'}, Tl, H)"
        if long_hidden is None or long_labels is None:
            raise ValueError(
                f"long_hidden: required when alpha > 0 (got alpha={options.alpha}): expected shape {meaning} "
                f"= ({n_long}, Tl, {weight.shape[1]}) with its long_labels; pass alpha=0 to skip SoLo-RA"
            )
        check_hidden_and_labels("long_hidden", long_hidden, "long_labels", long_labels, weight)
        check_shape("long_hidden", long_hidden, (n_long, None, weight.shape[1]), meaning)
        labels_to_check.append(("long_labels", long_labels))
    _check_references(options, ref_short_logps, ref_long_logps, n_pairs, short_labels)
    check_positive("temperature", temperature)
    check_chunk_size(chunk_size)
    kernel_options = check_kernel_options(kernel_options)
    resolve_backend(backend, short_hidden.device, short_hidden.dtype)
    group = context_parallel_group
    bad_labels = None
    if group is None:
        check_labels_and_lengths(labels_to_check, vocab, ignore_index, require_response=True)
    elif value_checks_enabled():
        # Checked after the all-reduce, on every rank alike (a rank may hold no response token of
        # a row; a local error would leave the other ranks waiting in the collective). Labels out
        # of range are never read out of bounds by the kernels meanwhile (they match no column).
        bad_labels = sum(
            ((t != ignore_index) & ((t < 0) | (t >= vocab))).sum() for _, t in labels_to_check
        )

    labels = [tensor for _, tensor in labels_to_check]
    positions = [response_positions(tensor, ignore_index) for tensor in labels]
    hiddens = [short_hidden, long_hidden][: len(labels)]
    gathered = [h[p] for h, p in zip(hiddens, positions)]
    targets = torch.cat([tensor[p] for tensor, p in zip(labels, positions)])
    token_logps = response_logprobs(
        torch.cat(gathered) if len(gathered) > 1 else gathered[0],
        weight,
        targets,
        bias,
        temperature=temperature,
        chunk_size=chunk_size,
        backend=backend,
        kernel_options=kernel_options,
    )
    per_input = token_logps.split([g.shape[0] for g in gathered])
    # Per-sequence sums in a fixed order (no atomics): scatter back to (rows, T), sum over T.
    sums = [
        scatter_to_positions(t, p, tensor.shape).sum(-1)
        for t, p, tensor in zip(per_input, positions, labels)
    ]
    lengths = [(tensor != ignore_index).sum(-1) for tensor in labels]
    if not options.uses_long:
        sums.append(None)
        lengths.append(None)
    return _reduce_and_score(
        options, sums, lengths, ref_short_logps, ref_long_logps, group, bad_labels
    )


class FusedSoLoPOLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_solopo_loss`; the keyword options are fixed at init
    (loose, or as one ``options=`` :class:`SoLoPOOptions`) and passed on as one object.

    Example::

        loss_fn = FusedSoLoPOLoss(loss_type="simpo", beta=2.0, gamma=0.5, alpha=1.0)
        out = loss_fn(model.lm_head.weight, short_hidden, short_labels, long_hidden, long_labels)
        out.loss.backward()
    """

    def __init__(
        self,
        *,
        loss_type: str = "dpo",
        beta: float = 0.1,
        alpha: float = 1.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        ra_target: str = "chosen",
        ra_distance: str = "abs",
        ra_use_reference: bool = True,
        ra_gradient: str = "both",
        nll_average: str = "sequence",
        ignore_index: int = -100,
        temperature: float = 1.0,
        chunk_size: ChunkSize = None,
        backend: str = "auto",
        kernel_options: KernelOptions | None = None,
        context_parallel_group: Any = None,
        options: SoLoPOOptions | None = None,
    ) -> None:
        super().__init__()
        self.options = _call_options(
            options,
            loss_type=loss_type,
            beta=beta,
            alpha=alpha,
            gamma=gamma,
            label_smoothing=label_smoothing,
            ra_target=ra_target,
            ra_distance=ra_distance,
            ra_use_reference=ra_use_reference,
            ra_gradient=ra_gradient,
            nll_average=nll_average,
        )
        check_positive("temperature", temperature)
        check_chunk_size(chunk_size)
        check_choice("backend", backend, BACKENDS)
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.backend = backend
        self.kernel_options = check_kernel_options(kernel_options)
        self.context_parallel_group = context_parallel_group

    def forward(
        self,
        weight: torch.Tensor,
        short_hidden: torch.Tensor,
        short_labels: torch.Tensor,
        long_hidden: torch.Tensor | None = None,
        long_labels: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ref_short_logps: torch.Tensor | None = None,
        ref_long_logps: torch.Tensor | None = None,
    ) -> SoLoPOOutput:
        return fused_solopo_loss(
            weight,
            short_hidden,
            short_labels,
            long_hidden,
            long_labels,
            bias,
            ref_short_logps=ref_short_logps,
            ref_long_logps=ref_long_logps,
            options=self.options,  # the loss options as one object
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            backend=self.backend,
            kernel_options=self.kernel_options,
            context_parallel_group=self.context_parallel_group,
        )

    def extra_repr(self) -> str:
        o = self.options
        return f"loss_type={o.loss_type!r}, beta={o.beta}, alpha={o.alpha}, ra_target={o.ra_target!r}, ra_gradient={o.ra_gradient!r}, backend={self.backend!r}"
