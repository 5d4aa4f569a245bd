"""Context parallelism for the per-sequence sums: a long row split along its length over a group.

With context parallelism (ring attention, Ulysses) each rank of a context-parallel group holds
one slice of every row along the sequence. The log-prob kernel runs on the rank's slice and gives
*partial* per-sequence sums: rank ``r`` holds ``s_r = sum of log p over the response tokens in its
slice`` and ``n_r``, their count. The objective needs the full sums ``S = sum_r s_r`` and
``N = sum_r n_r``, so the partials are all-reduced over the group before the rewards; every rank
then computes the same loss ``L(S)``.

Gradients: every rank backpropagates its own copy of ``L``, and ``dL/ds_r = dL/dS`` (the
all-reduce's backward is the identity, not another all-reduce, which would count the same
gradient once per rank). So each rank's hidden-state gradients are its slices of the unsplit
ones, and the ``lm_head`` gradients summed over the group are the unsplit ones. Engines that
*average* gradients over the group (FSDP2 sharding over data x context ranks, DDP over all ranks)
need the loss gradient multiplied by the group size first: :func:`scale_gradient`.

Shard orders (:func:`shard_indices`), for a row of ``T`` positions (padded to a multiple first):

* ``"contiguous"``: rank ``r`` holds ``[r T/W, (r + 1) T/W)`` (Ulysses, Axolotl's contiguous
  split);
* ``"head_tail"``: the row is cut into ``2W`` chunks and rank ``r`` holds chunks ``r`` and
  ``2W - 1 - r`` (the load-balanced order of causal ring attention: every rank gets an equal share
  of the causal mask's work; PyTorch's ``context_parallel`` and ring "zigzag" use it).

The labels must be shifted *before* the split (:func:`shift_labels`): the target of a slice's last
position is the first token of the next slice, which the rank does not hold.
"""

from __future__ import annotations

from typing import Any

import torch

SHARD_ORDERS = ("contiguous", "head_tail")


def _check_layout(world_size: int, rank: int, order: str) -> None:
    if order not in SHARD_ORDERS:
        raise ValueError(f"order: expected one of {SHARD_ORDERS}, got {order!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")


def padded_length(length: int, world_size: int, order: str) -> int:
    """The smallest length ``>= length`` that ``order`` splits evenly over ``world_size`` ranks
    (a multiple of ``world_size``, or of ``2 * world_size`` for ``"head_tail"``)."""
    multiple = world_size * (2 if order == "head_tail" else 1)
    return -(-length // multiple) * multiple


def shard_indices(length: int, world_size: int, rank: int, order: str) -> torch.Tensor:
    """Positions (int64, increasing) of rank ``rank``'s slice of a row of ``length`` positions,
    which must already be a multiple of what ``order`` needs (see :func:`padded_length`)."""
    _check_layout(world_size, rank, order)
    if length != padded_length(length, world_size, order):
        raise ValueError(
            f"length: {length} is not a multiple of {padded_length(1, world_size, order)} "
            f"(order={order!r} over {world_size} ranks); pad it first (padded_length)"
        )
    if order == "contiguous":
        size = length // world_size
        return torch.arange(rank * size, (rank + 1) * size)
    size = length // (2 * world_size)
    head = torch.arange(rank * size, (rank + 1) * size)
    tail = torch.arange(length - (rank + 1) * size, length - rank * size)
    return torch.cat([head, tail])


def pad_sequence(tensor: torch.Tensor, length: int, value: Any, *, dim: int = 1) -> torch.Tensor:
    """``tensor`` right-padded with ``value`` along ``dim`` to ``length`` positions."""
    missing = length - tensor.shape[dim]
    if missing < 0:
        raise ValueError(f"length: {length} is shorter than the tensor's {tensor.shape[dim]}")
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def shard_sequence(
    tensor: torch.Tensor,
    rank: int,
    world_size: int,
    *,
    order: str = "contiguous",
    pad_value: Any = 0,
    dim: int = 1,
) -> torch.Tensor:
    """This rank's slice along ``dim`` of ``tensor`` (e.g. ``(rows, T, H)`` hidden states or
    ``(rows, T)`` shifted labels), after right-padding with ``pad_value`` to
    :func:`padded_length` (pad labels with ``ignore_index``: padding is never a response)."""
    _check_layout(world_size, rank, order)
    length = padded_length(tensor.shape[dim], world_size, order)
    padded = pad_sequence(tensor, length, pad_value, dim=dim)
    index = shard_indices(length, world_size, rank, order).to(tensor.device)
    return padded.index_select(dim, index)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with the positions that predict them: ``out[..., t] = labels[..., t + 1]``
    and ``ignore_index`` at the last position (the layout the losses take), ``(rows, T)``."""
    return pad_sequence(labels[..., 1:], labels.shape[-1], ignore_index, dim=labels.dim() - 1)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in the forward, identity in the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_over_group(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``group`` on every rank; differentiable, with the
    gradient of each rank's partial equal to the gradient of the sum (module docstring)."""
    if not tensor.requires_grad:
        total = tensor.clone()
        torch.distributed.all_reduce(total, group=group)
        return total
    return _SumOverGroup.apply(tensor, group)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged, with its gradient multiplied by ``factor`` in the backward: for an
    engine that averages gradients over a context-parallel group of ``factor`` ranks, whose ranks
    each hold a partial gradient that must be summed (the logged loss keeps its value)."""
    if factor == 1:
        return tensor
    return _ScaleGradient.apply(tensor, float(factor))


def group_size(group: Any) -> int:
    """Number of ranks in ``group`` (checked to be a usable process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(
            "context_parallel_group: torch.distributed is not initialised; create the process "
            "group first (e.g. torch.distributed.init_process_group)"
        )
    try:
        return torch.distributed.get_world_size(group)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(
            f"context_parallel_group: expected a torch.distributed process group, got {group!r} ({error})"
        ) from None
