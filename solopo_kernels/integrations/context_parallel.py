"""Context parallelism in the trainers: how a SoLoPO step runs when each row is split along its
length over a context-parallel group (the engines' ring attention / Ulysses; the sums and their
gradients are :mod:`solopo_kernels.context_parallel`'s).

A step under context parallelism:

1. The model inputs of each padded batch (the short pair batch, the long batch) are built on the
   whole row: ``input_ids``, ``position_ids = 0..T-1`` and the **labels shifted before the split**
   (``shift_labels``: a slice's last position keeps its target, the first token of the next
   slice), padded to the multiple the shard order needs (pad labels -100, positions continuing),
   with no attention mask (right padding under a causal mask never reaches a real token).
2. Each rank keeps its slice: either the trainer cuts it (PyTorch/accelerate context parallelism,
   whose ring attention expects the head+tail order), or the engine does, in a forward pre-hook
   that splits every ``(B, S)`` tensor argument of the model (Axolotl's ringmaster; it pads
   ``shift_labels`` with -100).
3. The patched forward (:mod:`.model_patch`, ``solopo_logps=True``) scores the slice: partial
   per-row sums and counts.
4. :func:`solopo_kernels.solopo_loss` all-reduces them over the group (every rank computes the
   same loss); reference sums are all-reduced too.
5. The engines average gradients over the group's ranks (FSDP2 shards over data x context ranks),
   while each rank holds a partial gradient that must be *summed*: the loss gradient is
   multiplied by the group size (:func:`solopo_kernels.context_parallel.scale_gradient`); the
   logged loss keeps its value.

Packing (``padding_free``) is not combined with context parallelism: the engines' causal ring
attention has no block-diagonal mask for packed sequences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..context_parallel import SHARD_ORDERS, padded_length, shard_indices, shift_labels

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ContextParallelPlan:
    """How a trainer runs a step under context parallelism.

    Attributes:
        group: the ``torch.distributed`` process group the rows are split over.
        order: the shard order, ``"contiguous"`` or ``"head_tail"`` (only read when the trainer
            cuts the slices itself).
        shard_inputs: True when the trainer cuts each rank's slice of the model inputs; False when
            the engine does it in a forward pre-hook of the model.
        gradient_scale: factor on the loss gradient that turns the engine's average of the
            ranks' gradients into their sum (the group size for FSDP2/DDP averaging).
    """

    group: Any
    order: str = "head_tail"
    shard_inputs: bool = True
    gradient_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.order not in SHARD_ORDERS:
            raise ValueError(f"order: expected one of {SHARD_ORDERS}, got {self.order!r}")

    @property
    def size(self) -> int:
        return torch.distributed.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank(self.group)


def model_inputs(
    plan: ContextParallelPlan,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    pad_token_id: int = 0,
    token_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Keyword arguments of a context-parallel forward for a right-padded batch ``(rows, T)``:
    ``input_ids``, ``position_ids`` and ``shift_labels`` (response tokens only), padded to the
    multiple ``plan.order`` needs and, with ``plan.shard_inputs``, cut to this rank's slice.
    ``token_mask`` (the batch's attention mask) is passed on as ``solopo_token_mask`` (padded with
    0) for what counts tokens inside the forward: an MoE model's router load-balancing sums; an
    engine that cuts the slices pads and cuts it like every other ``(rows, T)`` argument."""
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    rows, length = input_ids.shape
    total = padded_length(length, plan.size, plan.order)
    pad = total - length
    inputs = {
        "input_ids": torch.nn.functional.pad(input_ids, (0, pad), value=pad_token_id),
        "position_ids": torch.arange(total, device=input_ids.device).expand(rows, total),
        "shift_labels": torch.nn.functional.pad(shift_labels(labels), (0, pad), value=IGNORE_INDEX),
    }
    if token_mask is not None:
        inputs["solopo_token_mask"] = torch.nn.functional.pad(token_mask, (0, pad), value=0)
    if not plan.shard_inputs:
        return inputs
    index = shard_indices(total, plan.size, plan.rank, plan.order).to(input_ids.device)
    return {key: value.index_select(1, index) for key, value in inputs.items()}


def accelerate_plan(accelerator: Any) -> ContextParallelPlan | None:
    """The plan of accelerate's context parallelism (``ParallelismConfig(cp_size=...)``, FSDP2),
    or None when it is off. The trainer cuts the head+tail slices itself (the order PyTorch's ring
    attention is load-balanced for; see :func:`torch_context`)."""
    config = getattr(accelerator, "parallelism_config", None)
    if config is None or not getattr(config, "cp_enabled", False):
        return None
    backend = getattr(config, "cp_backend", "torch")
    if backend != "torch":
        raise ValueError(
            f"parallelism_config: SoLoPOTrainer supports cp_backend='torch' (PyTorch context "
            f"parallelism), got cp_backend={backend!r}"
        )
    return ContextParallelPlan(
        group=accelerator.torch_device_mesh["cp"].get_group(),
        order="head_tail",
        shard_inputs=True,
        gradient_scale=float(config.cp_size),
    )


def engine_plan(accelerator: Any, group: Any) -> ContextParallelPlan | None:
    """The plan when the engine cuts the slices in a forward pre-hook of the model (Axolotl's
    ringmaster, whose group is ``group``), or None when accelerate's parallelism config has no
    context parallelism. Rows are padded to a multiple of twice the group size, which suits both
    orders the engine may pick (contiguous, or head+tail for ring attention)."""
    config = getattr(accelerator, "parallelism_config", None)
    if config is None or not getattr(config, "cp_enabled", False):
        return None
    if group is None:
        raise ValueError(
            "context_parallel_size: context parallelism is on but the engine registered no "
            "context-parallel process group (Axolotl's ContextParallelPlugin sets it up)"
        )
    return ContextParallelPlan(
        group=group, order="head_tail", shard_inputs=False, gradient_scale=float(config.cp_size)
    )


def prepare_torch_models(*models: torch.nn.Module | None) -> None:
    """Check and prepare the models for PyTorch's context parallelism through accelerate: SDPA
    attention (the only kind its ring attention replaces), and accelerate's hooks that drop the
    attention mask for ``is_causal`` on every attention module (accelerate adds them to the
    models it prepares itself; TRL prepares the reference model apart)."""
    from accelerate.big_modeling import _attach_context_parallel_hooks

    from .packing import attention_implementation

    for model in models:
        if model is None:
            continue
        implementation = attention_implementation(model)
        if implementation != "sdpa":
            raise ValueError(
                f"attn_implementation: context parallelism with accelerate (cp_backend='torch') runs "
                f"PyTorch's ring attention, which replaces SDPA only; got {implementation!r}: load "
                "the model with attn_implementation='sdpa'"
            )
        if not getattr(model, "_solopo_cp_hooks", False):
            _attach_context_parallel_hooks(model)
            model._solopo_cp_hooks = True


def torch_context(accelerator: Any, plan: ContextParallelPlan) -> Callable[[], Any]:
    """A factory of accelerate's context-parallel context for a SoLoPO step.

    PyTorch's ``context_parallel`` shards the buffers it is given with one length for all of them,
    while a SoLoPO step has two batches of different lengths (short and long); the trainer cuts
    their slices itself (head+tail, :func:`model_inputs`) and hands the context one placeholder
    buffer of ``2 x group size`` positions. Its only effect is then the one that matters: SDPA is
    replaced by ring attention, load-balanced (head+tail), for the forwards and the backward.
    """
    placeholder = torch.zeros((1, 2 * plan.size), dtype=torch.long, device=accelerator.device)
    return functools.partial(
        accelerator.maybe_context_parallel,
        buffers=[placeholder],
        buffer_seq_dims=[1],
        no_restore_buffers={placeholder},
    )
