"""A per-instance forward patch that returns response log-prob sums instead of logits.

``patch_solopo_forward(model)`` replaces ``model.forward`` (on the instance, not the class) with a
version that, when called with ``solopo_labels=...``, runs the backbone (``model.base_model``),
reads ``lm_head`` *at call time* and scores the labelled positions with the package's log-prob
op (:func:`solopo_kernels.ops.logprobs.response_logprobs`). Without ``solopo_labels`` it is the
original forward, so generation and every other caller are unchanged.

Why inside the forward: a trainer always calls the wrapped model (DDP, FSDP2, DeepSpeed, ...).
The kernel then runs inside the wrapper's forward, where FSDP2 has unsharded the root unit's
parameters (``lm_head`` included) and DDP has armed its gradient reducer, so the ``lm_head``
gradient is reduced like any other. Reading ``lm_head.weight`` after the forward, outside the
wrapper, gives a sharded ``DTensor`` under FSDP2 (and a wrong gradient if one calls
``full_tensor()`` on it); that case raises here instead of training on it. Under DeepSpeed ZeRO-3
the read itself, inside the model's forward, makes DeepSpeed all-gather the partitioned weight and
register it as an external parameter of the model, which its pre-backward hook gathers again for
the kernel's backward (tested against one process in tests/integrations/test_zero3.py).

Mixed precision: the ``solopo_labels`` path runs under whatever autocast is active when it is
called. accelerate's native AMP puts its autocast on the instance's ``forward`` when it prepares
the model, and the patch replaces that attribute (other calls still go through it), so a caller
that relies on it enters the same context around the call, as the trainer does
(:func:`solopo_kernels.integrations.trl.forward_autocast`).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from ..ops.logprobs import (
    head_dtypes_match,
    response_logprobs,
    response_positions,
    scatter_to_positions,
)
from .args import HeadKernel
from .moe import RouterLoad, moe_sizes, router_load

IGNORE_INDEX = -100
_PATCHED_FLAG = "_solopo_forward_patched"


@dataclass
class SoLoPOLogProbsOutput(ModelOutput):
    """What a patched model returns when called with ``solopo_labels``.

    Attributes:
        logps: ``(B,)`` float32 sums of the log-probs of the response tokens of each row.
        lengths: ``(B,)`` int64 response-token counts of each row.
        logit_sums: ``(B,)`` float32, detached: the sum over every position and every vocabulary
            column of the logits the model's head would have produced for each row (padding
            included), or None unless asked for with ``solopo_logit_sums=True``.
        router_assignments, router_probabilities, router_rows: an MoE model called with
            ``output_router_logits=True``: the sums of its load-balancing loss over this forward's
            tokens (``(E,)``, ``(E,)``, ``()`` float32; see :mod:`.moe`), else None.
    """

    logps: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    logit_sums: torch.Tensor | None = None
    router_assignments: torch.Tensor | None = None
    router_probabilities: torch.Tensor | None = None
    router_rows: torch.Tensor | None = None

    @property
    def router_load(self) -> RouterLoad | None:
        """The load-balancing sums of this forward (:class:`~.moe.RouterLoad`), present when it
        was called with ``output_router_logits=True``."""
        if self.router_assignments is None:
            return None
        return RouterLoad(self.router_assignments, self.router_probabilities, self.router_rows)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# How each family transforms the logits after the lm_head projection, read from its modeling code
# (transformers 5.24): (config attribute, "multiply" or "divide"). The kernel computes
# log_softmax(z / temperature), so a multiplier s is temperature 1 / s and a divisor d is
# temperature d: both exact. The same attribute name means opposite things in different families
# (Granite divides by logits_scaling, HyperCLOVA X multiplies by it), so it is keyed on model_type.
_LOGIT_SCALES = {
    "cohere": ("logit_scale", "multiply"),
    "cohere2": ("logit_scale", "multiply"),
    "cohere2_moe": ("logit_scale", "multiply"),
    "granite": ("logits_scaling", "divide"),
    "granite_swa": ("logits_scaling", "divide"),
    "granitemoe": ("logits_scaling", "divide"),
    "granitemoe_swa": ("logits_scaling", "divide"),
    "granitemoeshared": ("logits_scaling", "divide"),
    "granitemoehybrid": ("logits_scaling", "divide"),
    "hyperclovax": ("logits_scaling", "multiply"),
}
# Config attributes through which some family rescales or caps its logits.
_HEAD_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def head_temperature(config: Any) -> float:
    """The kernel ``temperature`` that reproduces a model's head from its config, or a
    ``ValueError`` naming the config option the kernel cannot compute.

    Plain heads give 1.0; Cohere's ``logit_scale`` s (logits multiplied by s) gives ``1 / s``;
    Granite's ``logits_scaling`` d (logits divided by d) gives ``d``. Soft-capping
    (``final_logit_softcapping``, Gemma-2) is refused, and so is a scaling attribute on a family
    not in the table above (its direction is not known).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(config).__name__
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(
            f"{name}.final_logit_softcapping={cap}: this model soft-caps its logits "
            "(cap * tanh(logits / cap)), which solopo_kernels' log-prob kernel does not compute; "
            "set final_logit_softcapping=None in the model config only if you mean to train without it"
        )
    model_type = getattr(text_config, "model_type", None)
    known = _LOGIT_SCALES.get(model_type)
    temperature = 1.0
    for attribute in _HEAD_TRANSFORMS:
        value = getattr(text_config, attribute, None)
        if value is None:
            continue
        if known is not None and attribute == known[0]:
            value = float(value)
            if not value > 0:
                raise ValueError(f"{name}.{attribute}: expected a positive scale, got {value}")
            temperature = 1.0 / value if known[1] == "multiply" else value
        elif value != 1.0:
            raise ValueError(
                f"{name}.{attribute}={value}: this model transforms its logits after the lm_head "
                f"projection in a way solopo_kernels does not know for model_type={model_type!r}"
            )
    return temperature


def sums_per_sequence(
    token_logps: torch.Tensor,
    positions: tuple[torch.Tensor, ...],
    sequence_ids: torch.Tensor,
    n_sequences: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums ``(n_sequences,)`` of the log-probs ``token_logps (N,)`` found at
    ``positions`` of a packed ``(rows, T)`` layout whose ``sequence_ids (rows, T)`` say which
    sequence each position belongs to, and the response-token counts ``(n_sequences,)`` int64.

    The values are scattered into a ``(n_sequences, T)`` table and summed along ``T``: a fixed
    order (deterministic, no atomic adds), the same order as the padded layout's row sums. A
    sequence lies in one row, so ``(sequence, column)`` is unique per token.
    """
    sequence = sequence_ids[positions]
    columns = positions[-1]
    width = sequence_ids.shape[-1]
    table = torch.zeros((n_sequences, width), dtype=token_logps.dtype, device=token_logps.device)
    logps = table.index_put((sequence, columns), token_logps).sum(-1)
    counts = torch.zeros((n_sequences, width), dtype=torch.long, device=sequence.device)
    lengths = counts.index_put((sequence, columns), torch.ones_like(sequence)).sum(-1)
    return logps, lengths


def patch_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` gets patched: the base model under PEFT (whose wrappers call
    ``base_model.model.forward`` with all keyword arguments), the model itself otherwise."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model


def patch_solopo_forward(
    model: torch.nn.Module, kernel: HeadKernel | None = None
) -> torch.nn.Module:
    """Add the ``solopo_labels`` path to ``model``'s forward (idempotent); returns ``model``.

    ``model`` is a causal LM (or a PEFT model around one) that is not wrapped by DDP/FSDP/DeepSpeed
    (unwrap it first; the wrapper keeps calling the patched instance forward). ``kernel`` (a
    :class:`~.args.HeadKernel`; None: the defaults) is passed unchanged to the kernel on every call;
    patching again replaces it. The head's logit scale, if any, becomes the kernel's
    ``temperature`` (:func:`head_temperature`; a head the kernel cannot compute raises here).
    After patching::

        out = model(input_ids=ids, attention_mask=mask, solopo_labels=labels)
        out.logps    # (B,) float32: sum over t of log p(labels[:, t] | ids[:, :t]), labels != -100
        out.lengths  # (B,) int64: number of such positions

    ``labels`` has the shape of ``input_ids`` and is *not* shifted (``labels[:, t]`` is the token
    at position ``t``; -100 marks prompt and padding positions), like the model's own ``labels``.

    With ``solopo_logit_sums=True`` (padded rows only) the output also has ``logit_sums (B,)``:
    each row's sum of the logits over all its positions and the whole vocabulary, for trainers
    that log the mean logit (LLaMA-Factory's ``logits/chosen``). It needs no logits: the sum over
    the vocabulary of ``h . w_v + b_v`` is ``h . sum_v(w_v) + sum_v(b_v)``.

    Packed rows (several sequences end to end, see :mod:`.packing`)::

        out = model(input_ids=ids, position_ids=pos, solopo_labels=labels, solopo_sequence_ids=seq)
        out.logps    # (S,) float32 sums per sequence id, S = seq.max() + 1
        out.lengths  # (S,) int64 response-token counts per sequence id

    where ``seq (B, T)`` holds each position's sequence index (-1: padding). The prediction from
    one sequence's last token to the next sequence's first token is never scored. Other keyword
    arguments (``cu_seq_lens_q``, ``max_length_q``, ...) go to the backbone.

    Already shifted labels (context parallelism: the labels are shifted on the whole row, then
    the row is split over the ranks, so a slice's last position keeps its target)::

        out = model(input_ids=ids, position_ids=pos, shift_labels=shifted, solopo_logps=True)

    scores ``shifted[:, t]`` (-100: not a response token) at every position ``t``, including the
    last. The name ``shift_labels`` is the one context-parallel engines pad with -100 when they
    split the row (Axolotl's ringmaster). ``solopo_token_mask`` (the slice of the row's attention
    mask, 0 for padding) says which tokens count in the router sums below; all do without it.

    MoE models: with ``output_router_logits=True`` each convention also returns the sums of the
    router load-balancing loss over its tokens (``out.router_load``, see :mod:`.moe`), computed
    here so that the router logits of every layer need not leave the forward.
    """
    target = patch_target(model)
    if not hasattr(target, "base_model") or not hasattr(target, "get_output_embeddings"):
        raise TypeError(
            f"model: expected a transformers causal LM with a backbone (base_model) and an lm_head, "
            f"got {type(target).__name__}"
        )
    if kernel is not None and not isinstance(kernel, HeadKernel):
        raise TypeError(f"kernel: expected a HeadKernel or None, got {type(kernel).__name__}")
    # Read per call, so that patching again (another trainer on the same model) takes effect.
    target._solopo_head = (head_temperature(target.config), kernel or HeadKernel())
    if getattr(target, _PATCHED_FLAG, False):
        return model
    original_forward = target.forward

    # Keep the original signature visible: generate() and Trainer inspect it.
    @functools.wraps(type(target).forward)
    def forward(
        self: torch.nn.Module,
        *args: Any,
        solopo_labels: torch.Tensor | None = None,
        solopo_sequence_ids: torch.Tensor | None = None,
        solopo_logps: bool = False,
        solopo_logit_sums: bool = False,
        **kwargs: Any,
    ) -> Any:
        if solopo_labels is None and not solopo_logps:
            if solopo_sequence_ids is not None or solopo_logit_sums:
                name = (
                    "solopo_sequence_ids"
                    if solopo_sequence_ids is not None
                    else "solopo_logit_sums"
                )
                raise ValueError(f"{name}: only meaningful together with solopo_labels")
            return original_forward(*args, **kwargs)
        if solopo_logit_sums and (solopo_logps or solopo_sequence_ids is not None):
            raise ValueError(
                "solopo_logit_sums: only computed for padded rows (not with solopo_logps or "
                "solopo_sequence_ids)"
            )
        if kwargs.pop("labels", None) is not None:
            raise ValueError(
                "labels: pass either labels (the model's own loss) or solopo_labels, not both"
            )
        kwargs["use_cache"] = False
        if solopo_logps:
            return _sliced_forward(self, args, kwargs, solopo_labels, solopo_sequence_ids)
        if "shift_labels" in kwargs:
            raise ValueError("shift_labels: only read with solopo_logps=True (context parallelism)")
        if solopo_sequence_ids is not None:
            return _packed_forward(self, args, kwargs, solopo_labels, solopo_sequence_ids)
        return _padded_forward(self, args, kwargs, solopo_labels, logit_sums=solopo_logit_sums)

    target.forward = types.MethodType(forward, target)
    setattr(target, _PATCHED_FLAG, True)
    return model


# --------------------------------------------------------------- one function per convention
def _padded_forward(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    labels: torch.Tensor,
    *,
    logit_sums: bool = False,
) -> SoLoPOLogProbsOutput:
    """Padded rows ``(B, T)``, unshifted labels: position ``t`` predicts ``labels[:, t + 1]``."""
    full_hidden, router = _backbone(model, args, kwargs, kwargs.get("attention_mask"))
    hidden, labels = full_hidden[:, :-1], labels[:, 1:]
    token_logps, positions = _score(model, hidden, labels)
    logps = scatter_to_positions(token_logps, positions, labels.shape).sum(-1)
    return SoLoPOLogProbsOutput(
        logps=logps,
        lengths=(labels != IGNORE_INDEX).sum(-1),
        logit_sums=_logit_sums(model, full_hidden) if logit_sums else None,
        **router,
    )


@torch.no_grad()
def _logit_sums(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float32: per row, the sum over all ``T`` positions of ``hidden (B, T, H)`` and all
    ``V`` columns of the head's logits, ``(sum_t h_t) . (sum_v w_v) + T * sum_v b_v``, divided by
    the head's temperature. Both sums accumulate in float32 without a float32 copy of either
    operand (``O(B*T*H + V*H)`` work, ``O(B*H + H)`` memory)."""
    temperature, _ = model._solopo_head
    head = model.get_output_embeddings()
    column_sum = head.weight.sum(0, dtype=torch.float32)
    row_sums = hidden.sum(1, dtype=torch.float32).to(column_sum.device) @ column_sum
    if head.bias is not None:
        row_sums = row_sums + hidden.shape[1] * head.bias.sum(dtype=torch.float32)
    return row_sums / temperature


def _packed_forward(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor,
) -> SoLoPOLogProbsOutput:
    """Packed rows: unshifted labels and the sequence id of each position (-1: padding); sums
    per sequence id."""
    if sequence_ids.shape != labels.shape:
        raise ValueError(
            f"solopo_sequence_ids: expected the shape of solopo_labels {tuple(labels.shape)}, got "
            f"{tuple(sequence_ids.shape)}"
        )
    hidden, router = _backbone(model, args, kwargs, sequence_ids >= 0)
    hidden = hidden[:, :-1]
    targets_sequence = sequence_ids[:, 1:]
    # The last token of a sequence does not predict the first token of the next one (the padded
    # layout never scores that position either), and padding (-1) belongs to no sequence.
    labels = labels[:, 1:].masked_fill(
        (targets_sequence != sequence_ids[:, :-1]) | (targets_sequence < 0), IGNORE_INDEX
    )
    token_logps, positions = _score(model, hidden, labels)
    logps, lengths = sums_per_sequence(
        token_logps, positions, targets_sequence, int(sequence_ids.max()) + 1
    )
    return SoLoPOLogProbsOutput(logps=logps, lengths=lengths, **router)


def _sliced_forward(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    labels: torch.Tensor | None,
    sequence_ids: torch.Tensor | None,
) -> SoLoPOLogProbsOutput:
    """A context-parallel slice: ``shift_labels`` already shifted on the whole row, scored at
    every position of the slice (partial sums; the loss all-reduces them)."""
    shifted = kwargs.pop("shift_labels", None)
    if shifted is None or labels is not None or sequence_ids is not None:
        raise ValueError(
            "shift_labels: solopo_logps=True scores shift_labels (already shifted, the shape of "
            "input_ids) and takes neither solopo_labels nor solopo_sequence_ids"
        )
    # No attention mask reaches a slice (context-parallel attention drops it): the tokens that
    # count in the router sums come as solopo_token_mask (every token without it).
    token_mask = kwargs.pop("solopo_token_mask", None)
    hidden, router = _backbone(model, args, kwargs, token_mask)
    token_logps, positions = _score(model, hidden, shifted)
    logps = scatter_to_positions(token_logps, positions, shifted.shape).sum(-1)
    return SoLoPOLogProbsOutput(logps=logps, lengths=(shifted != IGNORE_INDEX).sum(-1), **router)


def _backbone(
    model: torch.nn.Module, args: tuple, kwargs: dict, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The backbone's last hidden states and, when ``output_router_logits=True`` was asked for,
    the router sums of the tokens ``token_mask`` marks (the output fields, else empty): only the
    sums leave this function, not the router logits of every layer."""
    out = model.base_model(*args, **kwargs)
    if not kwargs.get("output_router_logits"):
        return out.last_hidden_state, {}
    sizes = moe_sizes(model.config)
    if sizes is None or getattr(out, "router_logits", None) is None:
        raise ValueError(
            f"output_router_logits: {type(model).__name__} returned no router logits; only an MoE "
            "model (a config with output_router_logits) has a load-balancing loss"
        )
    load = router_load(out.router_logits, *sizes, token_mask)
    fields = {
        "router_assignments": load.assignments,
        "router_probabilities": load.probabilities,
        "router_rows": load.rows,
    }
    return out.last_hidden_state, fields


def _score(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Log-probs ``(N,)`` of the ``labels (B, T)`` that are not -100, from ``hidden (B, T, H)``
    and the model's lm_head, and the positions they were found at."""
    temperature, kernel = model._solopo_head
    # Looked up per call: FSDP and PEFT swap modules after patching.
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if _is_dtensor(weight):
        raise RuntimeError(
            "lm_head.weight is a sharded DTensor inside the forward: its FSDP unit was not unsharded "
            "by this forward. Shard lm_head together with the root module (or with the final norm, "
            "as accelerate's FSDP2 layout does) so that it is gathered when the kernel reads it."
        )
    if weight.dim() != 2 or weight.numel() == 0:
        # What a DeepSpeed ZeRO-3 partition looks like when nothing gathered it: DeepSpeed only
        # gathers parameters read inside the forward of the module it wraps.
        raise RuntimeError(
            f"lm_head.weight has shape {tuple(weight.shape)} inside the forward, expected "
            "(vocab, hidden): a DeepSpeed ZeRO-3 partition that was not gathered. Call the model "
            "that deepspeed.initialize wrapped (the trainer's model), not a module inside it."
        )
    positions = response_positions(labels, IGNORE_INDEX)
    # Under autocast the lm_head would have run in the autocast dtype: so do the rows, and a
    # float32 (master) weight stays as it is: the kernel rounds it to the rows' dtype tile by
    # tile, so no whole 16-bit copy of the head is made and kept for the backward (1.1 GB at
    # Qwen2.5-7B's head). Only a 16-bit weight of another dtype is cast. Without autocast the
    # rows take the weight's dtype, as nn.Linear would need.
    device_type = weight.device.type
    rows = hidden[positions].to(device=weight.device)
    if torch.is_autocast_enabled(device_type):
        rows = rows.to(torch.get_autocast_dtype(device_type))
        if not head_dtypes_match(rows.dtype, weight.dtype):
            weight = weight.to(rows.dtype)
    else:
        rows = rows.to(weight.dtype)
    token_logps = response_logprobs(
        rows,
        weight,
        labels[positions].to(weight.device),
        bias,
        temperature=temperature,
        **kernel.as_kwargs(),
    )
    return token_logps, positions
