"""Tiled PyTorch forward and backward of per-token log-probs (the CPU path, and the fallback).

Both passes walk the vocabulary in tiles of ``vocab_tile`` columns (outer loop, so each weight
tile is read and up-cast once per pass) and the gathered response rows in tiles of
``token_tile`` rows (inner loop). Only one ``token_tile x vocab_tile`` logits tile exists at a
time; the softmax normaliser is folded online (running max and rescaled sum of exponentials), and
the target logit is picked from the tile that holds its id. Everything is accumulated in float32
(float64 for float64 inputs), whatever the input dtype.

With a saved-logits budget (:class:`.tiles.KernelOptions`), the forward writes the logits of the
first ``tiles.saved_columns`` columns of all rows, one GEMM per vocabulary tile, straight into one
``(N, saved_columns)`` float32 (float64) tensor, and the backward turns those tiles into
``dlogits`` in place (it consumes them) and runs their gradient GEMMs over all rows at once:
tiles there are views of the saved tensor, so their height costs no memory.

FLOPs: forward ``2 N H V``; backward ``6 N H V`` (recomputed logits, ``grad_rows``, ``grad_weight``),
minus ``2 N H`` per saved column. The backward's tile loop is :mod:`.gradients`, shared with the
Triton backend.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .gradients import accumulate_gradients
from .tiles import KernelOptions, Tiles, saved_columns, tile_bounds, vocab_bounds

# Tile budgets, in logits elements. The CPU budget keeps a float32 tile at 16 MiB (cache- and
# RAM-friendly on a laptop-class CPU); on an accelerator larger tiles amortise launch overhead.
_TILE_ELEMENTS = {"cpu": 1 << 22}
_TILE_ELEMENTS_ACCELERATOR = 1 << 26
# Up-cast weight tiles (vocab_tile x H) are kept under this many elements.
_WEIGHT_TILE_ELEMENTS = 1 << 23


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
    budget = options.saved_logits_bytes if options is not None else 0
    # Inside the saved columns a tile is a view of the saved logits: all rows at once cost no
    # memory, and give the GEMMs their full height.
    saved = {"saved_columns": saved_columns(budget, n_rows, vocab), "saved_token_tile": n_rows}
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
    """``(rows @ weight.T + bias) / temperature`` for already up-cast tiles, into ``out`` (a view
    of the saved logits) or a fresh tensor."""
    if bias is not None:
        logits = torch.addmm(bias, rows, weight.t(), out=out)
    else:
        logits = torch.mm(rows, weight.t(), out=out)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


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
        save_logits: keep the logits of columns ``[0, tiles.saved_columns)`` for the backward.
    Returns:
        ``(logp, lse, saved)``: ``(N,)`` log-probs and log-sum-exps in the accumulation dtype
        (float32, or float64), and the ``(N, saved_columns)`` saved logits (None if none).
    """
    acc = accumulation_dtype(rows.dtype)
    n_rows, vocab = rows.shape[0], weight.shape[0]
    token_bounds = tile_bounds(0, n_rows, max(1, tiles.token_tile))
    edge = min(tiles.saved_columns, vocab) if save_logits else 0
    saved = torch.empty((n_rows, edge), dtype=acc, device=rows.device) if edge else None
    running_max = torch.full((n_rows,), -math.inf, dtype=acc, device=rows.device)
    running_sum = torch.zeros(n_rows, dtype=acc, device=rows.device)
    target_logit = torch.zeros(n_rows, dtype=acc, device=rows.device)
    bounds = vocab_bounds(replace(tiles, saved_columns=edge), vocab, tiles.vocab_tile)
    scratch = _Scratch(
        acc, rows.device
    )  # one tile, reused: no allocation (nor page faults) per tile
    for v0, v1 in bounds:
        w, b = _head_tile(weight, bias, v0, v1, rows.dtype, acc)
        if v1 <= edge:  # one GEMM of all rows, straight into the saved logits
            _logits_tile(rows.to(acc), w, b, temperature, out=saved[:, v0:v1])
        for t0, t1 in token_bounds:
            kept = saved[t0:t1, v0:v1] if v1 <= edge else None
            if kept is None:
                out = scratch.tile(t1 - t0, v1 - v0)
                logits = _logits_tile(rows[t0:t1].to(acc), w, b, temperature, out=out)
            else:
                logits = kept
            local, in_tile = _target_columns(targets[t0:t1], v0, v1 - v0)
            picked = logits.gather(1, local).squeeze(1)
            target_logit[t0:t1] = torch.where(in_tile, picked, target_logit[t0:t1])
            new_max = torch.maximum(running_max[t0:t1], logits.amax(1))
            if kept is None:
                shifted = logits.sub_(new_max.unsqueeze(1))
            else:  # the saved logits stay as they are
                shifted = torch.sub(logits, new_max[:, None], out=scratch.tile(t1 - t0, v1 - v0))
            tile_sum = shifted.exp_().sum(1)
            running_sum[t0:t1] = (
                running_sum[t0:t1] * torch.exp(running_max[t0:t1] - new_max) + tile_sum
            )
            running_max[t0:t1] = new_max
    lse = running_max + torch.log(running_sum)
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

    Each logits tile is recomputed into one reused buffer (or, for the columns of ``saved``,
    taken from the forward's logits, which it overwrites: ``saved`` is consumed) and turned into
    ``dlogits = grad_logp * (onehot(target) - softmax) / temperature``; the shared tile loop of
    :mod:`.gradients` accumulates the gradients from it.
    """
    acc = accumulation_dtype(rows.dtype)
    scale = grad_logp.to(acc) / temperature
    edge = saved.shape[1] if saved is not None else 0
    cached: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
    scratch = _Scratch(acc, rows.device)

    def fill(t0: int, t1: int, v0: int, v1: int) -> torch.Tensor:
        if v1 <= edge:  # a saved tile: no GEMM, and no new tile either
            dlogits = saved[t0:t1, v0:v1].sub_(lse[t0:t1].unsqueeze(1))
        else:
            if (v0, v1) not in cached:  # up-cast each weight tile once, not once per token tile
                cached.clear()
                cached[v0, v1] = _head_tile(weight, bias, v0, v1, rows.dtype, acc)
            w, b = cached[v0, v1]
            out = scratch.tile(t1 - t0, v1 - v0)
            dlogits = _logits_tile(rows[t0:t1].to(acc), w, b, temperature, out=out)
            dlogits.sub_(lse[t0:t1].unsqueeze(1))
        dlogits.exp_()  # softmax probabilities
        dlogits.mul_(-scale[t0:t1].unsqueeze(1))
        local, in_tile = _target_columns(targets[t0:t1], v0, v1 - v0)
        return dlogits.scatter_add_(1, local, (scale[t0:t1] * in_tile).unsqueeze(1))

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
