"""Tiled PyTorch forward and backward of per-token log-probs (the CPU path, and the fallback).

Both passes walk the vocabulary in tiles of ``vocab_tile`` columns (outer loop, so each weight
tile is read and up-cast once per pass) and the gathered response rows in tiles of
``token_tile`` rows (inner loop). Only one ``token_tile x vocab_tile`` logits tile exists at a
time. Everything is accumulated in float32 (float64 for float64 inputs), whatever the input dtype.

What a tile costs besides its GEMM is what decides the speed on a CPU, where a 16 MiB tile does
not stay in cache between two passes over it. So each tile gets one pass of ATen's fused row
kernels, which hold a row in cache while they reduce and rewrite it:

* forward: ``log_softmax`` in place gives the tile's log-sum-exp per row (the first column's
  logit minus its log-probability; the row's largest column instead where the first one is
  masked, see :func:`_tile_lse`), folded into the running one with ``logaddexp``; the target
  logit is picked before;
* backward: the recomputed tile becomes its probabilities by ``softmax`` in place when it spans
  the vocabulary (else ``exp(logits - lse)``), minus the one-hot of the targets (one element per
  row), and the row factor ``-g / temperature`` is applied to the ``(rows, H)`` sides of the
  gradient GEMMs (:class:`.gradients.FactoredTile`), not to the tile; ``1 / temperature`` is the
  GEMM's ``alpha``.

With a saved-logits budget (:class:`.tiles.KernelOptions`), the forward writes the first
``tiles.saved_columns`` columns of all rows, one GEMM per vocabulary tile, straight into one
contiguous ``(N, width)`` block per tile, leaves them as log-probabilities (``logits - lse``),
and the backward exponentiates them in place (it consumes them) and runs their gradient GEMMs
over all rows at once: tiles there are views of the saved tensor, so their height costs no
memory.

FLOPs: forward ``2 N H V``; backward ``6 N H V`` (recomputed logits, ``grad_rows``, ``grad_weight``),
minus ``2 N H`` per saved column. The backward's tile loop is :mod:`.gradients`, shared with the
Triton backend.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .gradients import FactoredTile, accumulate_gradients
from .tiles import KernelOptions, Tiles, tile_bounds, vocab_bounds

# Tile budgets, in logits elements. The CPU budget keeps a float32 tile at 16 MiB (cache- and
# RAM-friendly on a laptop-class CPU); on an accelerator larger tiles amortise launch overhead.
_TILE_ELEMENTS = {"cpu": 1 << 22}
_TILE_ELEMENTS_ACCELERATOR = 1 << 26
# Up-cast weight tiles (vocab_tile x H) are kept under this many elements.
_WEIGHT_TILE_ELEMENTS = 1 << 23
# A tile's log-sum-exp is read off its first column when that column's log-prob is at least
# -FIRST_COLUMN_SPAN (error about 2**-24 * (2 * FIRST_COLUMN_SPAN + |lse|) nats), else off the
# row's largest column (see _tile_lse). 64 nats: a first column that far below its tile's top is
# a masked one, not a token of a trained model's head.
FIRST_COLUMN_SPAN = 64.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (used by gradcheck); every other input accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_tiles(
    n_rows: int,
    hidden: int,
    vocab: int,
    device: torch.device,
    chunk_size: int | tuple[int, int] | None,
    options: KernelOptions | None = None,
    dtype: torch.dtype | None = None,
) -> Tiles:
    """Tiles for ``n_rows`` gathered rows against a ``(vocab, hidden)`` weight (any ``dtype``).

    ``chunk_size`` overrides the defaults: an int sets the token tile, a pair sets both. By default
    the vocab tile is the largest power of two that keeps an up-cast weight tile under
    ``_WEIGHT_TILE_ELEMENTS`` (at least 256 columns), and the token tile fills the logits budget.
    ``options.saved_logits_bytes`` sets how many leading columns the forward saves.
    """
    budget = (options or KernelOptions()).saved_logits_budget
    # Inside the saved columns a tile is a view of the saved logits: all rows at once cost no
    # memory, and give the GEMMs their full height. (The most this call may save; the dispatch
    # narrows it to what the budget has left, see .saved_logits.)
    saved = {"saved_columns": budget.columns(n_rows, vocab, in_use=0), "saved_token_tile": n_rows}
    if isinstance(chunk_size, tuple):
        return Tiles(*chunk_size, **saved)
    vocab_tile = min(vocab, max(256, 1 << int(math.log2(max(1, _WEIGHT_TILE_ELEMENTS // hidden)))))
    if chunk_size is not None:
        return Tiles(chunk_size, vocab_tile, **saved)
    elements = _TILE_ELEMENTS.get(device.type, _TILE_ELEMENTS_ACCELERATOR)
    token_tile = max(16, elements // vocab_tile)
    return Tiles(min(token_tile, max(1, n_rows)), vocab_tile, **saved)


def _logits_tile(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(rows @ weight.T + bias) / temperature`` for already up-cast tiles, into ``out`` (a
    contiguous tile buffer) or a fresh tensor; ``1 / temperature`` is the GEMM's ``alpha`` (and
    the bias's ``beta``), not a pass of its own."""
    scale = 1.0 / temperature
    if bias is not None:
        return torch.addmm(bias, rows, weight.t(), beta=scale, alpha=scale, out=out)
    if scale == 1.0:
        return torch.mm(rows, weight.t(), out=out)
    if out is None:
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype, device=rows.device)
    return torch.addmm(out, rows, weight.t(), beta=0, alpha=scale, out=out)


def _head_tile(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    v0: int,
    v1: int,
    rows_dtype: torch.dtype,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (and bias) columns ``[v0, v1)`` up-cast to ``acc``. A float32 head with 16-bit rows
    is first rounded to the rows' dtype, tile by tile, as autocast would round it for the GEMM:
    the logits are those of the 16-bit head, and no full-size copy of the weight is made."""
    w, b = weight[v0:v1], bias[v0:v1] if bias is not None else None
    if weight.dtype != rows_dtype:
        w, b = w.to(rows_dtype), b.to(rows_dtype) if b is not None else None
    return w.to(acc), b.to(acc) if b is not None else None


def _target_columns(
    targets: torch.Tensor, start: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each target in the vocab tile ``[start, start + width)`` (clamped, so
    always a valid index) and whether the target really lies in the tile."""
    local = targets - start
    in_tile = (local >= 0) & (local < width)
    return local.clamp(0, width - 1).unsqueeze(1), in_tile


class _Scratch:
    """One reused tile buffer, grown to the largest tile asked for."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.buffer = torch.empty(0, dtype=dtype, device=device)

    def tile(self, n: int, width: int) -> torch.Tensor:
        if self.buffer.numel() < n * width:
            self.buffer = torch.empty(n * width, dtype=self.dtype, device=self.device)
        return self.buffer[: n * width].view(n, width)


def _log_softmax_(tile: torch.Tensor) -> torch.Tensor:
    """``tile - logsumexp(tile, 1)`` in place, by ATen's fused row kernel (each row is read while
    it is in cache: one pass over the tile from memory instead of four separate ones for max,
    subtract, exp and sum). Only for contiguous tiles: the kernel mishandles a strided ``out``."""
    return torch.ops.aten._log_softmax.out(tile, 1, False, out=tile)


def _softmax_(tile: torch.Tensor) -> torch.Tensor:
    """``softmax(tile, 1)`` in place, by ATen's fused row kernel (contiguous tiles only)."""
    return torch.ops.aten._softmax.out(tile, 1, False, out=tile)


def _tile_lse(
    log_probs: torch.Tensor,
    first: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Per-row log-sum-exp of a logits tile that :func:`_log_softmax_` has just turned into
    ``log_probs`` in place, given the logits of its first column (``first``).

    ``logsumexp = logit - log_prob`` holds for any column, and the first one is free. It is exact
    to float32 rounding only where that column's log-prob is moderate: the subtraction cancels
    ``|logit|`` and ``|log_prob|``, so the error is about ``2**-24 * (|logit| + |log_prob|)``. A
    masked first column (a bias of ``-1e9``, ``-1e30`` or ``finfo.min``: log-prob ``-1e30``, the
    row's own log-sum-exp lost below its rounding) would give tens of nats of error, and ``-inf``
    (or a tile whose every column is ``-inf``) gives NaN. So rows whose first log-prob is below
    ``-FIRST_COLUMN_SPAN`` (or NaN) take the row's largest column instead (log-prob in
    ``[-log(width), 0]``: the best-conditioned one), whose logit is recomputed by one dot product
    per such row. Rows with no finite logit get ``-inf``, and their log-probs (NaN from the
    softmax of ``-inf`` only) become ``-inf``, so a saved tile holds probability 0 there. Costs one
    host sync per tile (free on the CPU); the rare rows cost ``O(width + H)`` each.
    """
    lead = log_probs[:, 0]
    tile_lse = first - lead
    bad = torch.nonzero(~(lead >= -FIRST_COLUMN_SPAN)).squeeze(1)  # NaN is bad too
    if bad.numel() == 0:
        return tile_lse
    top = log_probs.index_select(0, bad).argmax(1)  # argmax of the log-probs = of the logits
    logit = (rows.index_select(0, bad) * weight.index_select(0, top)).sum(1)
    if bias is not None:
        logit = logit + bias.index_select(0, top)
    logit = logit / temperature
    exact = logit - log_probs[bad, top]
    empty = logit == -math.inf  # no finite logit in this tile's row
    tile_lse[bad] = exact.masked_fill(empty, -math.inf)
    log_probs.index_fill_(0, bad[empty], -math.inf)
    return tile_lse


def _saved_blocks(
    n_rows: int, edge: int, vocab_tile: int
) -> list[tuple[int, int, int]]:
    """``(v0, v1, offset)`` of each saved vocabulary tile: tile ``[v0, v1)`` of all rows is the
    contiguous ``(n_rows, v1 - v0)`` block at ``offset`` of the flat saved tensor."""
    blocks, offset = [], 0
    for v0, v1 in tile_bounds(0, edge, max(1, vocab_tile)):
        blocks.append((v0, v1, offset))
        offset += n_rows * (v1 - v0)
    return blocks


def forward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    tiles: Tiles,
    save_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row target log-prob and log-sum-exp.

    Args:
        rows: ``(N, H)`` gathered response hidden states (any float dtype).
        weight: ``(V, H)`` lm_head weight, the dtype of ``rows``, or float32 with 16-bit ``rows``
            (then rounded to their dtype tile by tile).
        bias: ``(V,)`` or None.
        targets: ``(N,)`` integer target ids in ``[0, V)``.
        tiles: from :func:`default_tiles`.
        save_logits: keep columns ``[0, tiles.saved_columns)`` for the backward.
    Returns:
        ``(logp, lse, saved)``: ``(N,)`` log-probs and log-sum-exps in the accumulation dtype
        (float32, or float64), and the saved columns as one flat tensor of ``(N, width)``
        blocks, one per vocabulary tile, holding the log-probabilities ``logits - lse`` (None if
        nothing is saved).
    """
    acc = accumulation_dtype(rows.dtype)
    n_rows, vocab = rows.shape[0], weight.shape[0]
    token_bounds = tile_bounds(0, n_rows, max(1, tiles.token_tile))
    edge = min(tiles.saved_columns, vocab) if save_logits else 0
    saved = torch.empty(n_rows * edge, dtype=acc, device=rows.device) if edge else None
    blocks = {(v0, v1): offset for v0, v1, offset in _saved_blocks(n_rows, edge, tiles.vocab_tile)}
    lse = torch.full((n_rows,), -math.inf, dtype=acc, device=rows.device)
    target_logit = torch.zeros(n_rows, dtype=acc, device=rows.device)
    rows_acc = rows.to(acc)  # once, not once per vocabulary tile (a no-op in float32)
    scratch = _Scratch(acc, rows.device)  # one tile, reused: no allocation (nor page faults) per tile
    saved_tile_lse = []
    for v0, v1 in vocab_bounds(replace(tiles, saved_columns=edge), vocab, tiles.vocab_tile):
        w, b = _head_tile(weight, bias, v0, v1, rows.dtype, acc)
        width = v1 - v0
        if (v0, v1) in blocks:  # one GEMM of all rows, straight into the saved block
            start = blocks[v0, v1]
            pieces = [(0, n_rows, saved[start : start + n_rows * width].view(n_rows, width))]
        else:
            pieces = [(t0, t1, None) for t0, t1 in token_bounds]
        for t0, t1, out in pieces:
            out = out if out is not None else scratch.tile(t1 - t0, width)
            logits = _logits_tile(rows_acc[t0:t1], w, b, temperature, out=out)
            local, in_tile = _target_columns(targets[t0:t1], v0, width)
            picked = logits.gather(1, local).squeeze(1)
            target_logit[t0:t1] = torch.where(in_tile, picked, target_logit[t0:t1])
            first = logits[:, 0].clone()
            _log_softmax_(logits)
            tile_lse = _tile_lse(logits, first, rows_acc[t0:t1], w, b, temperature)
            lse[t0:t1] = torch.logaddexp(lse[t0:t1], tile_lse)
            if (v0, v1) in blocks:
                saved_tile_lse.append((logits, tile_lse))
    # Saved blocks hold logits - (their tile's lse); make it logits - lse, so that the backward
    # only exponentiates them (nothing to do when one tile spans the vocabulary).
    for block, tile_lse in saved_tile_lse:
        if block.shape[1] < vocab:
            block.add_((tile_lse - lse).unsqueeze(1))
    return target_logit - lse, lse, saved


def backward(
    grad_logp: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    *,
    temperature: float,
    tiles: Tiles,
    needs_grad: tuple[bool, bool, bool],
    saved: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. ``rows``, ``weight`` and ``bias``.

    Each tile becomes the probabilities ``softmax`` of its rows (recomputed into one reused
    buffer, or, for the saved columns, exponentiated in place: ``saved`` is consumed), handed to
    the shared tile loop of :mod:`.gradients` as ``softmax - onehot`` in a
    :class:`.gradients.FactoredTile` with the row factor ``-grad_logp / temperature``, which the
    loop applies to the GEMMs' ``(rows, H)`` sides: each tile costs one pass besides its GEMMs.
    """
    acc = accumulation_dtype(rows.dtype)
    scale = grad_logp.to(acc) / temperature
    n_rows, vocab = rows.shape[0], weight.shape[0]
    edge = saved.numel() // n_rows if saved is not None and n_rows else 0
    blocks = _saved_blocks(n_rows, edge, tiles.vocab_tile)
    cached: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
    scratch = _Scratch(acc, rows.device)
    rows_acc = rows.to(acc)
    neg_scale = -scale

    def saved_probs(t0: int, t1: int, v0: int, v1: int) -> torch.Tensor:
        """Saved columns ``[v0, v1)`` of rows ``[t0, t1)`` exponentiated in place: a view of
        the forward's block holding them, or, for a backward tile across two blocks (a narrowed
        tile), the pieces put together. (A loop, not a recursion: a recursive closure is a
        reference cycle that would keep the saved logits alive past the backward.)"""
        pieces = []
        for b0, b1, offset in blocks:
            lo, hi = max(v0, b0), min(v1, b1)
            if lo < hi:
                block = saved[offset : offset + n_rows * (b1 - b0)].view(n_rows, b1 - b0)
                pieces.append(block[t0:t1, lo - b0 : hi - b0].exp_())
        assert pieces and sum(p.shape[1] for p in pieces) == v1 - v0, (v0, v1, blocks)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def fill(t0: int, t1: int, v0: int, v1: int) -> FactoredTile:
        if (v0, v1) not in cached:  # up-cast each weight tile once, not once per token tile
            cached.clear()
            cached[v0, v1] = _head_tile(weight, bias, v0, v1, rows.dtype, acc)
        w, b = cached[v0, v1]
        if v1 <= edge:  # a saved tile: no GEMM, and no new tile either
            probs = saved_probs(t0, t1, v0, v1)
        else:
            logits = _logits_tile(
                rows_acc[t0:t1], w, b, temperature, out=scratch.tile(t1 - t0, v1 - v0)
            )
            if v1 - v0 == vocab:  # the tile spans the vocabulary: its softmax is the softmax
                probs = _softmax_(logits)
            else:
                probs = logits.sub_(lse[t0:t1].unsqueeze(1)).exp_()
        # dlogits = g / T * (onehot - p) = (-g / T) * (p - onehot): subtract the one-hot (one
        # element per row, so no two writes meet) and leave the row factor to the GEMMs.
        local, in_tile = _target_columns(targets[t0:t1], v0, v1 - v0)
        probs.scatter_add_(1, local, -in_tile.to(acc).unsqueeze(1))
        return FactoredTile(probs, neg_scale[t0:t1], rows_acc[t0:t1], w)

    return accumulate_gradients(
        rows,
        weight,
        bias,
        fill,
        tiles=replace(tiles, saved_columns=edge),
        needs_grad=needs_grad,
        acc_dtype=acc,
        dlogits_dtype=acc,
    )
