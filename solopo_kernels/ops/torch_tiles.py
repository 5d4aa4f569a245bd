"""Tiled PyTorch forward and backward of per-token log-probs (the CPU path, and the fallback).

Both passes walk the vocabulary in tiles of ``vocab_tile`` columns (outer loop, so each weight
tile is read and up-cast once per pass) and the gathered response rows in tiles of
``token_tile`` rows (inner loop). Only one ``token_tile x vocab_tile`` logits tile exists at a
time; the softmax normaliser is folded online (running max and rescaled sum of exponentials), and
the target logit is picked from the tile that holds its id. Everything is accumulated in float32
(float64 for float64 inputs), whatever the input dtype.

FLOPs: forward ``2 N H V``; backward ``6 N H V`` (recomputed logits, ``grad_rows``, ``grad_weight``).
The backward's tile loop is :mod:`.gradients`, shared with the Triton backend.
"""

from __future__ import annotations

import math

import torch

from .gradients import accumulate_gradients

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
) -> tuple[int, int]:
    """Return ``(token_tile, vocab_tile)``.

    ``chunk_size`` overrides the defaults: an int sets the token tile, a pair sets both. By default
    the vocab tile is the largest power of two that keeps an up-cast weight tile under
    ``_WEIGHT_TILE_ELEMENTS`` (at least 256 columns), and the token tile fills the logits budget.
    """
    if isinstance(chunk_size, tuple):
        return chunk_size
    vocab_tile = min(vocab, max(256, 1 << int(math.log2(max(1, _WEIGHT_TILE_ELEMENTS // hidden)))))
    if chunk_size is not None:
        return chunk_size, vocab_tile
    budget = _TILE_ELEMENTS.get(device.type, _TILE_ELEMENTS_ACCELERATOR)
    token_tile = max(16, budget // vocab_tile)
    return min(token_tile, max(1, n_rows)), vocab_tile


def _logits_tile(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``(rows @ weight.T + bias) / temperature`` for already up-cast tiles; a fresh tensor."""
    logits = torch.addmm(bias, rows, weight.t()) if bias is not None else rows @ weight.t()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _target_columns(
    targets: torch.Tensor, start: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each target in the vocab tile ``[start, start + width)`` (clamped, so
    always a valid index) and whether the target really lies in the tile."""
    local = targets - start
    in_tile = (local >= 0) & (local < width)
    return local.clamp(0, width - 1).unsqueeze(1), in_tile


def forward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    tiles: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row target log-prob and log-sum-exp.

    Args:
        rows: ``(N, H)`` gathered response hidden states (any float dtype).
        weight: ``(V, H)`` lm_head weight, same dtype as ``rows``.
        bias: ``(V,)`` or None.
        targets: ``(N,)`` integer target ids in ``[0, V)``.
    Returns:
        ``(logp, lse)``, both ``(N,)`` in the accumulation dtype (float32, or float64).
    """
    acc = accumulation_dtype(rows.dtype)
    n_rows, vocab = rows.shape[0], weight.shape[0]
    token_tile, vocab_tile = tiles
    running_max = torch.full((n_rows,), -math.inf, dtype=acc, device=rows.device)
    running_sum = torch.zeros(n_rows, dtype=acc, device=rows.device)
    target_logit = torch.zeros(n_rows, dtype=acc, device=rows.device)
    for v0 in range(0, vocab, vocab_tile):
        v1 = min(v0 + vocab_tile, vocab)
        w = weight[v0:v1].to(acc)
        b = bias[v0:v1].to(acc) if bias is not None else None
        for t0 in range(0, n_rows, token_tile):
            t1 = min(t0 + token_tile, n_rows)
            logits = _logits_tile(rows[t0:t1].to(acc), w, b, temperature)
            local, in_tile = _target_columns(targets[t0:t1], v0, v1 - v0)
            picked = logits.gather(1, local).squeeze(1)
            target_logit[t0:t1] = torch.where(in_tile, picked, target_logit[t0:t1])
            new_max = torch.maximum(running_max[t0:t1], logits.amax(1))
            tile_sum = logits.sub_(new_max.unsqueeze(1)).exp_().sum(1)
            running_sum[t0:t1] = (
                running_sum[t0:t1] * torch.exp(running_max[t0:t1] - new_max) + tile_sum
            )
            running_max[t0:t1] = new_max
    lse = running_max + torch.log(running_sum)
    return target_logit - lse, lse


def backward(
    grad_logp: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    *,
    temperature: float,
    tiles: tuple[int, int],
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. ``rows``, ``weight`` and ``bias``.

    Each logits tile is recomputed and turned in place into
    ``dlogits = grad_logp * (onehot(target) - softmax) / temperature``; the shared tile loop of
    :mod:`.gradients` accumulates the gradients from it.
    """
    acc = accumulation_dtype(rows.dtype)
    scale = grad_logp.to(acc) / temperature
    cached: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def fill(t0: int, t1: int, v0: int, v1: int) -> torch.Tensor:
        if v0 not in cached:  # up-cast each weight tile once, not once per token tile
            cached.clear()
            cached[v0] = (weight[v0:v1].to(acc), bias[v0:v1].to(acc) if bias is not None else None)
        w, b = cached[v0]
        dlogits = _logits_tile(rows[t0:t1].to(acc), w, b, temperature)
        dlogits.sub_(lse[t0:t1].unsqueeze(1)).exp_()  # softmax probabilities
        dlogits.mul_(-scale[t0:t1].unsqueeze(1))
        local, in_tile = _target_columns(targets[t0:t1], v0, v1 - v0)
        return dlogits.scatter_add_(1, local, (scale[t0:t1] * in_tile).unsqueeze(1))

    return accumulate_gradients(
        rows, weight, bias, fill, tiles=tiles, needs_grad=needs_grad, acc_dtype=acc
    )
