"""The tile loop of the backward, shared by both backends.

A backend supplies one function, ``fill(t0, t1, v0, v1) -> dlogits | None``, which returns the
``[t1 - t0, v1 - v0]`` tile ``g * (onehot(target) - softmax) / temperature`` of rows ``[t0, t1)``
and vocabulary columns ``[v0, v1)`` (recomputed from the saved log-sum-exp), or None to skip the
tile. This module turns the tiles into the three gradients:

* outer loop over vocabulary tiles, so each weight-gradient tile is finished (and cast to the
  weight's dtype) once, through one reused float32 buffer when the weight is 16-bit;
* inner loop over token tiles; ``grad_rows += dlogits @ W_tile`` and
  ``grad_weight_tile += dlogits^T @ rows_tile`` accumulate in float32 (float64 for float64
  inputs) without rounding a tile's product to 16 bits; ``grad_bias`` is a float32 column sum.

Deterministic: a fixed loop order, no atomics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# torch.addmm(acc_fp32, a_16bit, b_16bit, out_dtype=torch.float32): CUDA, recent torch.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")

DlogitsTile = Callable[[int, int, int, int], "torch.Tensor | None"]


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` summed in ``acc``'s dtype: tensor-core GEMMs with a float32 output where
    the device has them, else the operands up-cast (exact: 16-bit values are exact in float32)."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _ADDMM_OUT_DTYPE and acc.is_cuda and a.dtype == b.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def accumulate_gradients(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fill: DlogitsTile,
    *,
    tiles: tuple[int, int],
    needs_grad: tuple[bool, bool, bool],
    acc_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. ``rows (N, H)``, ``weight (V, H)`` and ``bias (V,)`` from the ``dlogits``
    tiles of ``fill``, in the dtypes of those tensors (None where not needed).

    ``tiles = (token_tile, vocab_tile)``; ``acc_dtype`` is the accumulation dtype.
    """
    need_rows, need_weight, need_bias = needs_grad
    need_bias = need_bias and bias is not None
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]
    token_tile, vocab_tile = max(1, min(tiles[0], n_rows)), min(tiles[1], vocab)
    device = rows.device

    grad_rows = torch.zeros((n_rows, hidden), dtype=acc_dtype, device=device) if need_rows else None
    # Every vocabulary tile is zeroed before it accumulates; with no rows nothing is visited.
    empty_like = torch.empty_like if n_rows else torch.zeros_like
    grad_weight = empty_like(weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_bias else None
    # Weights in the accumulation dtype take their gradient tile in place; others go through one
    # reused buffer, cast once per vocabulary tile.
    weight_buffer = (
        torch.empty((vocab_tile, hidden), dtype=acc_dtype, device=device)
        if need_weight and weight.dtype != acc_dtype
        else None
    )

    if n_rows and (need_rows or need_weight or need_bias):
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(v0 + vocab_tile, vocab)
            weight_tile = weight[v0:v1]
            if need_weight:
                weight_grad_tile = (
                    grad_weight[v0:v1] if weight_buffer is None else weight_buffer[: v1 - v0]
                )
                weight_grad_tile.zero_()
            for t0 in range(0, n_rows, token_tile):
                t1 = min(t0 + token_tile, n_rows)
                dlogits = fill(t0, t1, v0, v1)
                if dlogits is None:
                    continue
                if need_rows:
                    addmm_into(grad_rows[t0:t1], dlogits, weight_tile)
                if need_weight:
                    addmm_into(weight_grad_tile, dlogits.t(), rows[t0:t1])
                if need_bias:
                    grad_bias[v0:v1] += dlogits.sum(0, dtype=acc_dtype)
            if weight_buffer is not None:
                grad_weight[v0:v1].copy_(weight_grad_tile)

    return (
        grad_rows.to(rows.dtype) if grad_rows is not None else None,
        grad_weight,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )
