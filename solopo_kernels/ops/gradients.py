"""The tile loop of the backward, shared by both backends.

A backend supplies one function, ``fill(t0, t1, v0, v1)``, for the ``[t1 - t0, v1 - v0]`` tile of
``dlogits = g * (onehot(target) - softmax) / temperature`` of rows ``[t0, t1)`` and vocabulary
columns ``[v0, v1)`` (recomputed from the saved log-sum-exp, or read from saved forward logits).
It returns one of

* the ``dlogits`` tile itself (the Triton backend, whose kernel forms it in registers);
* a :class:`FactoredTile` with ``dlogits = factor[:, None] * tile`` (the torch backend, whose tile
  is ``softmax - onehot``: one fused softmax pass and a one-element-per-row scatter): the row
  factor is applied to the ``(rows, H)`` sides of the GEMMs instead of the ``(rows, vocabulary)``
  tile, which saves a full pass over every tile;
* None, to skip the tile.

This module turns the tiles into the three gradients:

* outer loop over vocabulary tiles, so each weight-gradient tile is finished (and cast to the
  weight's dtype) once; inner loop over token tiles;
* ``grad_rows += dlogits @ W_tile`` and ``grad_weight_tile += dlogits^T @ rows_tile`` sum in
  float32 (float64 for float64 inputs) without rounding a partial product to 16 bits: into a
  float32 ``grad_rows`` accumulator, and for the weight gradient either straight into
  ``grad_weight`` (when it has the accumulation dtype, or when one token tile covers every row,
  so that one GEMM with float32 accumulation inside writes the tile) or through one reused float32
  buffer of at most :data:`WEIGHT_BUFFER_BYTES`; the first GEMM into an accumulator overwrites it
  (no separate zeroing pass); ``grad_bias`` is a float32 column sum.

On CUDA, a GEMM of 16-bit operands adds into a float32 accumulator by the route that
:mod:`.gemm_routes` probes on first use (one tensor-core GEMM with a float32 ``C`` where torch and
the GPU do it right).

Mixed dtypes (a float32 ``weight`` with bf16/fp16 ``rows``, as autocast training with float32
master weights has): each weight tile is cast to the rows' dtype as it is used (the forward
computed its logits from the rounded weight too), so no full-size copy of the weight exists; the
weight gradient is written in float32, the weight's dtype.

Deterministic: a fixed loop order, no atomics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .gemm_routes import matmul_into
from .tiles import Tiles, tile_bounds, vocab_bounds


class FactoredTile(NamedTuple):
    """``dlogits = factor[:, None] * tile`` of one tile. ``tile (rows, columns)`` and ``factor
    (rows,)`` are in the accumulation dtype; ``rows`` and ``weight`` are the accumulation-dtype
    operands the tile was computed from (the backend's up-cast copies, reused here)."""

    tile: torch.Tensor
    factor: torch.Tensor
    rows: torch.Tensor
    weight: torch.Tensor


DlogitsTile = Callable[[int, int, int, int], "torch.Tensor | FactoredTile | None"]

# The float32 weight-gradient buffer (vocab_tile x H) of 16-bit weights when several token tiles
# add into it: the vocabulary tile is narrowed so that the buffer stays under this size.
WEIGHT_BUFFER_BYTES = 256 << 20

def accumulate_gradients(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fill: DlogitsTile,
    *,
    tiles: Tiles,
    needs_grad: tuple[bool, bool, bool],
    acc_dtype: torch.dtype,
    dlogits_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. ``rows (N, H)``, ``weight (V, H)`` and ``bias (V,)`` from the tiles of
    ``fill``, in the dtypes of those tensors (None where not needed).

    ``tiles`` gives the tile shape and the saved columns (tiles never straddle their edge);
    ``acc_dtype`` is the accumulation dtype and ``dlogits_dtype`` the dtype of ``fill``'s tiles.
    """
    need_rows, need_weight, need_bias = needs_grad
    need_bias = need_bias and bias is not None
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]
    device = rows.device
    token_tile = max(1, min(tiles.token_tile, n_rows))
    vocab_tile = max(1, min(tiles.vocab_tile, vocab))
    token_bounds = tile_bounds(0, n_rows, token_tile)
    saved_token_bounds = tile_bounds(0, n_rows, max(1, tiles.saved_token_tile or token_tile))

    # The weight gradient is written straight into grad_weight when it has the accumulation
    # dtype, or when a single token tile (one GEMM per vocabulary tile) produces each of its
    # tiles from same-dtype operands; otherwise through a float32 buffer, kept under
    # WEIGHT_BUFFER_BYTES by narrowing the vocabulary tile.
    direct_weight = weight.dtype == acc_dtype or (
        max(len(token_bounds), len(saved_token_bounds)) <= 1
        and dlogits_dtype == rows.dtype == weight.dtype
    )
    if need_weight and not direct_weight:
        itemsize = torch.finfo(acc_dtype).bits // 8
        vocab_tile = min(vocab_tile, max(1, WEIGHT_BUFFER_BYTES // (hidden * itemsize)))
    v_bounds = vocab_bounds(tiles, vocab, vocab_tile)
    # Likewise grad_rows: straight into a rows-dtype gradient when one vocabulary tile covers V.
    direct_rows = rows.dtype == acc_dtype or (
        len(v_bounds) <= 1 and dlogits_dtype == rows.dtype == weight.dtype
    )

    grad_rows = None
    if need_rows:
        grad_rows = torch.zeros(
            (n_rows, hidden), dtype=rows.dtype if direct_rows else acc_dtype, device=device
        )
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_bias else None
    weight_buffer = None
    if need_weight and not direct_weight:
        width = max((hi - lo for lo, hi in v_bounds), default=0)
        weight_buffer = torch.empty((width, hidden), dtype=acc_dtype, device=device)

    for v0, v1 in v_bounds if n_rows and (need_rows or need_weight or need_bias) else []:
        # The weight tile in the rows' dtype for grad_rows' GEMM of plain tiles: a float32 weight
        # meets 16-bit rows here (a copy), made on first use; factored tiles carry their own.
        weight_tile = None
        weight_grad_tile = None
        if need_weight:
            weight_grad_tile = (
                grad_weight[v0:v1] if weight_buffer is None else weight_buffer[: v1 - v0]
            )
        written = False  # the first GEMM into weight_grad_tile overwrites it
        for t0, t1 in saved_token_bounds if v1 <= tiles.saved_columns else token_bounds:
            tile = fill(t0, t1, v0, v1)
            if tile is None:
                continue
            if isinstance(tile, FactoredTile):
                _add_factored(
                    tile, grad_rows[t0:t1] if need_rows else None, weight_grad_tile, written,
                    grad_bias[v0:v1] if need_bias else None,
                )  # fmt: skip
                written = written or need_weight
                continue
            if need_rows:  # with one vocabulary tile, each row block is written once
                if weight_tile is None:
                    weight_tile = weight[v0:v1].to(rows.dtype)
                matmul_into(grad_rows[t0:t1], tile, weight_tile, accumulate=len(v_bounds) > 1)
            if need_weight:
                matmul_into(weight_grad_tile, tile.t(), rows[t0:t1], accumulate=written)
                written = True
            if need_bias:
                grad_bias[v0:v1] += tile.sum(0, dtype=acc_dtype)
        if need_weight:
            if not written:  # every token tile skipped (opt-in filtering)
                weight_grad_tile.zero_()
            if weight_buffer is not None:
                grad_weight[v0:v1].copy_(weight_grad_tile)
    if need_weight and not n_rows:
        grad_weight.zero_()

    return (
        grad_rows.to(rows.dtype) if grad_rows is not None else None,
        grad_weight,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )


def _add_factored(
    tile: FactoredTile,
    grad_rows: torch.Tensor | None,
    weight_grad_tile: torch.Tensor | None,
    written: bool,
    bias_grad_tile: torch.Tensor | None,
) -> None:
    """The GEMMs of a :class:`FactoredTile` (``dlogits = f * T``): ``grad_rows += f * (T @ W)``
    (the factor scales the ``(rows, H)`` product, not the tile), ``grad_W_tile += T^T @ (f *
    rows)``, ``grad_bias_tile += T^T @ f``. No atomics: a fixed order, as the plain tiles."""
    values, factor, rows, weight = tile
    if grad_rows is not None:
        grad_rows.addcmul_(torch.mm(values, weight), factor[:, None])
    if weight_grad_tile is not None:
        matmul_into(weight_grad_tile, values.t(), rows * factor[:, None], accumulate=written)
    if bias_grad_tile is not None:
        bias_grad_tile.add_(values.t() @ factor)
