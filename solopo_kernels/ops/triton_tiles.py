"""Triton forward and backward of per-token log-probs (the CUDA path; CPU under the interpreter).

Same interface and semantics as :mod:`.torch_tiles`: ``logits = (rows @ weight.T + bias) /
temperature`` over gathered response rows ``(N, H)`` and the lm_head ``weight (V, H)``;
``logp = logits[target] - logsumexp(logits)``. docs/kernels.md explains the design and budgets.

Forward (one kernel, split-V, no logits in global memory)
    Program ``(row block, split)`` owns ``BLOCK_N`` rows and a contiguous range of the vocabulary
    (its *split*). It walks the split in ``BLOCK_V``-column tiles; each logits tile is a ``tl.dot``
    K-loop over ``H`` with float32 accumulation, bias and ``1 / temperature`` applied in registers,
    folded into a running max and a rescaled sum of exponentials, and the target logit is picked up
    when the target id falls in the tile. Only three float32 numbers per (split, row) are written,
    into a ``(3, splits, N)`` buffer; a few torch ops merge the splits (``O(splits * N)``, a fixed
    order: deterministic, no atomics, no locks). The number of splits comes from the SM count
    (:func:`vocab_splits`), so that small ``N`` still fills the GPU. With a saved-logits budget
    (:class:`.tiles.KernelOptions`) the kernel also stores the float32 logits of the first
    ``saved_columns`` columns.

Backward (a Triton tile kernel + cuBLAS GEMMs; exact by default)
    For a ``[token_tile, vocab_tile]`` tile, :func:`_dlogits_kernel` recomputes the logits (same
    ``tl.dot`` K-loop, same input precision as the forward) and writes
    ``dlogits = g * (onehot - exp(logits - lse)) / temperature``, computed in float32 and stored in
    the input dtype, into one reused buffer; tiles inside the saved columns are read from the
    forward's logits instead (:func:`_saved_dlogits_kernel`, no GEMM). Then
    ``grad_rows += dlogits @ W_tile`` and ``grad_weight_tile += dlogits^T @ rows_tile`` run as
    tensor-core GEMMs that accumulate in float32 (``grad_bias`` is a float32 column sum), in the
    shared tile loop of :mod:`.gradients`. Why this and not a fully fused backward: a fused kernel
    must reduce ``grad_rows`` over ``V`` and ``grad_weight`` over ``N``; without atomics that takes
    two kernels that each recompute the logits (10 NHV FLOPs instead of the 8 NHV budget), and with
    atomics it is non-deterministic. Here the recompute is fused (the logits never reach memory,
    only the ``dlogits`` tile does), the two gradient GEMMs run at cuBLAS speed, and the result is
    deterministic. Memory beyond the gradients: one ``token_tile x vocab_tile`` tile (at most
    ``2**26`` elements by default), a float32 ``(N, H)`` ``grad_rows`` accumulator, and for 16-bit
    weights with more than one token tile a float32 weight-gradient buffer of at most 256 MiB.

    ``dlogits`` is rounded to bf16/fp16 for 16-bit inputs *after* the softmax is formed in float32
    (the logits themselves are never rounded), and every product is summed in float32. fp16 inputs
    need ``|g| / temperature`` inside the fp16 range (65504); the losses here give ``|g|`` of order
    ``beta`` and ``alpha``.

Opt-in gradient filtering (CCE-style), :func:`skip_negligible_tiles`
    Skips the GEMMs of a ``[token_tile, vocab_tile]`` tile whose every ``|dlogits|`` is below a
    threshold ``eps`` (one host sync per tile). Values are unaffected; the gradient error is
    bounded by what is dropped: ``|d grad_rows[i, k]| <= eps * (skipped columns) * max|W|``,
    ``|d grad_weight[v, k]| <= eps * N * max|rows|``, ``|d grad_bias[v]| <= eps * N``. It pays only
    with tiles small enough to be uniformly negligible (set them with ``chunk_size``). Off by default.

Dtypes and precision: float32, bfloat16 and float16 (float64: use the torch backend). 16-bit
operands go to the tensor cores as they are (products exact in float32). float32 operands use the
3xTF32 split (``input_precision="tf32x3"``: each operand split into a TF32 high part and a TF32
remainder, three tensor-core products, relative error per product about ``2**-21``, against
``2**-24`` for IEEE float32 and ``2**-11`` for plain TF32); with
``torch.set_float32_matmul_precision("high")`` or ``"medium"``, plain TF32. The choice is made at
forward time and kept in :class:`.tiles.Tiles`, so that the backward recomputes the same logits.

Tolerances (what the tests check against the float64 reference computed from the same inputs,
as ``max |err| / max |ref|``): float32: values and gradients <= 1e-5; bfloat16/float16: values
<= 1e-5, gradients <= 1e-2 (the gradients are returned in the input dtype).

Block sizes: on CUDA ``triton.autotune`` over a short list of configs per operand dtype
(:data:`HALF_CONFIGS`, :data:`FP32_CONFIGS`), less those the compile report found spilling for
the case at hand (:func:`spills`: the operand dtype, saved logits, sm_90 or sm_80;
``benchmarks/compile_report.py``, Triton 3.6 and 3.9; a test checks the exclusions against the
committed report), keyed on ``(H, V)``, the dtypes and a bucket of the row count
(:func:`rows_bucket`); the results persist in Triton's cache. A call with more rows than the
largest bucket tunes on its first ``TUNE_ROWS_CAP`` rows, so a huge first call does not pay the
tuning at its full size. Under ``TRITON_INTERPRET=1``, one fixed small config.
``TRITON_INTERPRET`` must be set before this module (and Triton) is imported.
:data:`launch_counts` counts kernel launches, so tests can tell that the Triton path really ran.

FLOPs: forward ``2 N H V``; backward ``6 N H V`` (recomputed logits, ``grad_rows``, ``grad_weight``),
minus ``2 N H`` per saved column.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import triton
import triton.language as tl

from .gradients import accumulate_gradients
from .tiles import KernelOptions, Tiles, saved_columns

__all__ = ["Tiles", "backward", "default_tiles", "forward", "launch_counts"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = tl.constexpr(1.4426950408889634)

# Kernel launches by kind ("forward", "dlogits", "saved_dlogits") and tiles skipped by the opt-in
# filter ("skipped_tiles"). Tests read it to tell that the Triton path ran.
launch_counts: Counter[str] = Counter()

# On a GPU: matmul-shaped configs (the kernels are GEMMs with a reduction epilogue), autotuned per
# (H, V, dtypes, rows bucket). The compile report (benchmarks/results/compile/) lists what was
# dropped and why: 128x256x64, and 128-row blocks with 4 warps, spill (on sm_80 with both Triton
# versions, on sm_90 with 3.9); float32 operands spill or need 1 CTA/SM in 64-deep K-blocks.
# BLOCK_N=64 configs serve small N; 4-warp configs fit two or three CTAs per SM, 8-warp ones one.
HALF_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
FP32_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
_CONFIGS = HALF_CONFIGS + FP32_CONFIGS
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}
# Block of the saved-logits dlogits kernel (elementwise, no tuning needed).
_SAVED_BLOCK = {"BLOCK_N": 16, "BLOCK_V": 32} if _INTERPRET else {"BLOCK_N": 64, "BLOCK_V": 128}
# Geometry constants on a GPU (from the configs) and under the interpreter (its one config).
GPU_MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in _CONFIGS)
GPU_SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in _CONFIGS)
MAX_BLOCK_N = _INTERPRETER_CONFIG["BLOCK_N"] if _INTERPRET else GPU_MAX_BLOCK_N
# Vocabulary splits are whole multiples of every BLOCK_V, so no tile straddles two splits.
SPLIT_ALIGN = _INTERPRETER_CONFIG["BLOCK_V"] if _INTERPRET else GPU_SPLIT_ALIGN
# The smallest block edge of any launch: sizes the per-block max buffer of tile skipping.
_MIN_BLOCK = min(
    *_SAVED_BLOCK.values(),
    *(min(c["BLOCK_N"], c["BLOCK_V"]) for c in [_INTERPRETER_CONFIG] if _INTERPRET),
    *(min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in _CONFIGS if not _INTERPRET),
)
# A split spans at least one of the widest tiles (a tile is a full K-loop over H, which dwarfs the
# per-split overhead: program start, three partial stores, the merge).
MIN_SPLIT_TILES = 1
# Target number of forward programs per SM: enough waves that the last one is not mostly idle.
PROGRAMS_PER_SM = 4
# Default size of the backward dlogits tile, in elements (128 MiB in bf16). Under the interpreter
# tiles are tiny anyway; tests pick multi-tile shapes through chunk_size.
_DLOGITS_ELEMENTS = 1 << 14 if _INTERPRET else 1 << 26
# The token tile never exceeds this: past it the GEMMs are already large, and a bigger vocab tile
# means fewer passes over rows.
_MAX_TOKEN_TILE = 8192
# Autotuning keys on a row-count bucket (powers of 4 from 64) capped here.
TUNE_ROWS_CAP = 16384

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_skip_threshold = 0.0


@contextlib.contextmanager
def skip_negligible_tiles(threshold: float) -> Iterator[None]:
    """Opt in to CCE-style gradient filtering for the log-prob calls made inside the block.

    The backward of those calls skips the two gradient GEMMs of every ``[token_tile, vocab_tile]``
    tile whose largest ``|dlogits| = |g * (onehot - softmax)| / temperature`` is below
    ``threshold``. Values are exact; each gradient entry is off by at most what was dropped:
    ``eps * (skipped columns) * max|W|`` for ``grad_rows``, ``eps * N * max|rows|`` for
    ``grad_weight`` and ``eps * N`` for ``grad_bias`` (``eps = threshold``). The setting is read
    when the forward runs and applies to that call's backward wherever it runs.
    """
    global _skip_threshold
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
    previous, _skip_threshold = _skip_threshold, float(threshold)
    try:
        yield
    finally:
        _skip_threshold = previous


# ---------------------------------------------------------------------------------------------
# Geometry: pure functions of the sizes (and the SM count), tested without a GPU.


def rows_bucket(n_rows: int) -> int:
    """The autotuning bucket of a row count: the power of 4 (from 64) at or above it, capped at
    :data:`TUNE_ROWS_CAP`. Configs tuned at one size serve every size of its bucket."""
    bucket = 64
    while bucket < min(n_rows, TUNE_ROWS_CAP):
        bucket *= 4
    return min(bucket, TUNE_ROWS_CAP)


def vocab_splits(
    n_rows: int,
    vocab: int,
    sm_count: int,
    *,
    max_block_n: int = MAX_BLOCK_N,
    split_align: int = SPLIT_ALIGN,
) -> int:
    """Vocabulary splits of the forward grid: enough that ``row blocks x splits`` reaches
    ``PROGRAMS_PER_SM`` programs per SM (counting row blocks of the largest ``BLOCK_N``, so
    that any config gets at least that many), every split at least ``MIN_SPLIT_TILES`` tiles of
    ``split_align`` columns wide. The keywords default to this machine's geometry."""
    row_blocks = triton.cdiv(max(1, n_rows), max_block_n)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, row_blocks)
    if wanted <= 1:
        return 1
    # Columns per split rounded down to the alignment, so that rounding never loses splits.
    columns = max(MIN_SPLIT_TILES * split_align, vocab // wanted // split_align * split_align)
    return triton.cdiv(vocab, columns)


def split_columns(vocab: int, splits: int, *, split_align: int = SPLIT_ALIGN) -> tuple[int, int]:
    """``(columns per split, splits)``: splits of whole ``split_align`` multiples, the last one
    ragged, none empty (rounding up can leave fewer splits than asked)."""
    columns = triton.cdiv(triton.cdiv(vocab, max(1, splits)), split_align) * split_align
    return columns, triton.cdiv(vocab, columns)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _device_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """:func:`vocab_splits` for ``device``; 1 under the interpreter (tests ask for more)."""
    if _INTERPRET or device.type != "cuda":
        return 1
    return vocab_splits(n_rows, vocab, _sm_count(device))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: 3xTF32 for float32 operands (about float32 accuracy on tensor
    cores) unless torch allows TF32 for its own matmuls (``set_float32_matmul_precision("high")``
    or ``"medium"``: plain TF32); 16-bit operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def default_tiles(
    n_rows: int,
    hidden: int,
    vocab: int,
    device: torch.device,
    chunk_size: int | tuple[int, int] | None,
    options: KernelOptions | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tiles:
    """Tiles for ``n_rows`` gathered rows against a ``(vocab, hidden)`` weight of ``dtype``.

    The forward keeps no tile in memory, so ``chunk_size`` shapes only the backward ``dlogits``
    tile: an int sets its token rows, a pair ``(tokens, vocab columns)`` sets both. By default the
    token tile holds every row up to ``_MAX_TOKEN_TILE`` and the vocab tile fills the rest of the
    ``_DLOGITS_ELEMENTS`` budget (a multiple of the block width, at least one block).
    ``options.saved_logits_bytes`` sets the saved columns; the dot precision is fixed here.
    """
    if isinstance(chunk_size, tuple):
        token_tile, vocab_tile = chunk_size
    else:
        token_tile = chunk_size if chunk_size is not None else min(max(1, n_rows), _MAX_TOKEN_TILE)
        vocab_tile = max(SPLIT_ALIGN, _DLOGITS_ELEMENTS // token_tile // SPLIT_ALIGN * SPLIT_ALIGN)
    budget = options.saved_logits_bytes if options is not None else 0
    return Tiles(
        token_tile=max(1, min(token_tile, n_rows)),
        vocab_tile=min(vocab_tile, vocab),
        saved_columns=saved_columns(budget, n_rows, vocab),
        splits=_device_splits(n_rows, vocab, device),
        skip_threshold=_skip_threshold,
        dot_precision=dot_precision(dtype),
    )


# ---------------------------------------------------------------------------------------------
# Kernels.

# Integer arguments keep Triton's specialisation (divisibility by 16 known at compile time):
# without it the address arithmetic costs registers; the compile report measured 220 -> 234
# registers for the 128x128x64 forward, and spills once it saves logits (Triton 3.9). The price
# is a few compiled variants per kernel (a ragged N or V is "not divisible by 16").


@triton.jit
def _logits_block(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    cols,
    N,
    V,
    H,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(rows[offs_n] @ weight[cols].T + bias[cols]) * inv_temperature``: a float32
    ``[BLOCK_N, BLOCK_V]`` block that lives in registers. Loads are masked by the tensor bounds
    (rows past ``N`` and columns past ``V`` read as 0), so every entry is finite and nothing is
    read out of bounds; callers mask what they reduce or store. ``EVEN_K`` (``H`` a multiple of
    ``BLOCK_K``) drops the K masks. ``DOT_IN_FP32`` (interpreter only) feeds bf16 operands to
    ``tl.dot`` up-cast to float32, exactly: the interpreter has no bf16 dot and would multiply the
    raw bit patterns (triton-lang/triton#11584)."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    col_ok = cols < V
    # int64 offsets: V * H passes 2**31 for large vocabularies (256K x 8192). They are rebuilt
    # from these two vectors each step rather than carried as 2-D pointer tensors (fewer live
    # registers in the K-loop).
    row_off = offs_n.to(tl.int64) * stride_rn
    col_off = cols.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        h_ptrs = rows_ptr + row_off[:, None] + k[None, :] * stride_rh
        # The weight tile is loaded K-major, [BLOCK_K, BLOCK_V], ready for tl.dot.
        w_ptrs = weight_ptr + col_off[None, :] + k[:, None] * stride_wh
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = k < H
            h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _forward_kernel(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    partial_ptr,
    saved_ptr,
    N,
    V,
    H,
    ROWS,
    cols_per_split,
    saved_cols,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    SAVE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (row block, split): running max, sum of ``exp(logit - max)`` and the target logit
    over the split's columns, stored at ``partial[0 | 1 | 2, split, rows]`` (float32). With
    ``SAVE_LOGITS``, the logits of columns ``< saved_cols`` also go to ``saved[row, col]``.
    ``ROWS`` is the autotuning bucket of ``N`` (a key, unused here)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    # Padding rows get target -1, which no column matches (nor does any out-of-range label).
    target = tl.load(targets_ptr + offs_n, mask=row_ok, other=-1)
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logits = _logits_block(
            rows_ptr, weight_ptr, bias_ptr, offs_n, cols, N, V, H,
            stride_rn, stride_rh, stride_wv, stride_wh, inv_temperature,
            HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        in_split = (cols < v_end)[None, :]
        if SAVE_LOGITS:
            kept = row_ok[:, None] & in_split & (cols < saved_cols)[None, :]
            out = saved_ptr + offs_n.to(tl.int64)[:, None] * saved_cols + cols[None, :]
            tl.store(out, logits, mask=kept)
        # The target column lies in one tile of one split; every other tile adds 0 here.
        hit = in_split & (cols[None, :] == target[:, None])
        target_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)
        logits = tl.where(in_split, logits, float("-inf"))
        # Every tile has a column inside the split, so new_max is finite and the first rescale
        # is exp(-inf) = 0, never NaN. exp(x) is computed as exp2(x * log2(e)) (the hardware op).
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        tile_sum = tl.sum(tl.exp2((logits - new_max[:, None]) * _LOG2E), axis=1)
        run_sum = run_sum * tl.exp2((run_max - new_max) * _LOG2E) + tile_sum
        run_max = new_max

    # int64: splits x N can pass 2**31 for a very long batch.
    splits_x_n = tl.num_programs(1).to(tl.int64) * N
    out = partial_ptr + split.to(tl.int64) * N + offs_n
    tl.store(out, run_max, mask=row_ok)
    tl.store(out + splits_x_n, run_sum, mask=row_ok)
    tl.store(out + 2 * splits_x_n, target_logit, mask=row_ok)


@triton.jit
def _dlogits_epilogue(
    logits,
    offs_n,
    cols,
    row_ok,
    col_ok,
    t0,
    v0,
    targets_ptr,
    lse_ptr,
    grad_ptr,
    dlogits_ptr,
    block_max_ptr,
    stride_dn,
    inv_temperature,
    TRACK_MAX: tl.constexpr,
):
    """Turns a float32 logits block into ``dlogits`` and stores it at ``(offs_n - t0, cols -
    v0)`` of the tile; with ``TRACK_MAX`` also the block's ``max |dlogits|``."""
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    target = tl.load(targets_ptr + offs_n, mask=row_ok, other=-1)
    scale = tl.load(grad_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32) * inv_temperature
    prob = tl.exp2((logits - lse[:, None]) * _LOG2E)
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    dlogits = scale[:, None] * (onehot - prob)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    # int64 row offsets: a user tile (chunk_size tuple) may have tokens x columns >= 2**31.
    out = dlogits_ptr + (offs_n - t0).to(tl.int64)[:, None] * stride_dn + (cols - v0)[None, :]
    tl.store(out, dlogits.to(dlogits_ptr.dtype.element_ty), mask=tile_ok)
    if TRACK_MAX:
        block_max = tl.max(tl.max(tl.where(tile_ok, tl.abs(dlogits), 0.0), axis=1), axis=0)
        tl.store(
            block_max_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), block_max
        )


@triton.jit
def _dlogits_kernel(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    grad_ptr,
    dlogits_ptr,
    block_max_ptr,
    N,
    V,
    H,
    ROWS,
    t0,
    t_end,
    v0,
    v_end,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    stride_dn,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    TRACK_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dlogits[t - t0, v - v0] = g[t] * (onehot - softmax)[t, v] / temperature`` for the tile
    ``[t0, t_end) x [v0, v_end)``, the logits recomputed, formed in float32 and stored in
    ``dlogits``' dtype. ``ROWS``: the autotuning bucket of the tile's rows (unused here)."""
    offs_n = t0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    logits = _logits_block(
        rows_ptr, weight_ptr, bias_ptr, offs_n, cols, N, V, H,
        stride_rn, stride_rh, stride_wv, stride_wh, inv_temperature,
        HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    _dlogits_epilogue(
        logits, offs_n, cols, offs_n < t_end, cols < v_end, t0, v0, targets_ptr, lse_ptr,
        grad_ptr, dlogits_ptr, block_max_ptr, stride_dn, inv_temperature, TRACK_MAX,
    )  # fmt: skip


@triton.jit
def _saved_dlogits_kernel(
    saved_ptr,
    targets_ptr,
    lse_ptr,
    grad_ptr,
    dlogits_ptr,
    block_max_ptr,
    t0,
    t_end,
    v0,
    v_end,
    stride_sn,
    stride_dn,
    inv_temperature,
    TRACK_MAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """:func:`_dlogits_kernel` for a tile inside the saved columns: the logits are read from the
    forward's float32 ``saved[row, col]`` (row stride ``stride_sn``) instead of recomputed."""
    offs_n = t0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < t_end
    col_ok = cols < v_end
    ptrs = saved_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + cols[None, :]
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    _dlogits_epilogue(
        logits, offs_n, cols, row_ok, col_ok, t0, v0, targets_ptr, lse_ptr, grad_ptr,
        dlogits_ptr, block_max_ptr, stride_dn, inv_temperature, TRACK_MAX,
    )  # fmt: skip


def _configs_for_dtype(configs: list, named_args: dict, **kwargs: object) -> list:
    """Autotuning candidates for the call: the operand dtype's list (float32 operands, 3xTF32 or
    TF32 dots, need smaller K-blocks than 16-bit ones), less the configs the compile report
    found spilling for this case (:func:`spills`)."""
    rows = named_args.get("rows_ptr", named_args.get("rows_desc"))
    tensor = getattr(rows, "base", rows)  # a TMA descriptor holds its tensor as .base
    fp32 = tensor.dtype == torch.float32
    major = torch.cuda.get_device_capability(tensor.device)[0] if tensor.is_cuda else 9
    save = bool(kwargs.get("SAVE_LOGITS"))
    wanted = [
        c for c in (FP32_CONFIGS if fp32 else HALF_CONFIGS) if not spills(c, fp32, save, major)
    ]
    return [c for c in configs if any(c is w for w in wanted)]


def spills(config: triton.Config, fp32: bool, save: bool, major: int) -> bool:
    """Whether ``config`` spills registers for these operands on this architecture, per the
    compile report (benchmarks/results/compile/, Triton 3.6 and 3.9): float32 operands in
    128-wide blocks on sm_80, and with saved logits anywhere; 16-bit operands with saved logits
    in the 4-warp 64x128 block on sm_80."""
    wide = config.kwargs["BLOCK_V"] >= 128
    if fp32:
        return wide and (save or major < 9)
    return save and major < 9 and wide and config.num_warps == 4


_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0})


def autotuned(
    kernel: triton.JITFunction, configs: list, prune: Callable[..., list]
) -> triton.JITFunction:
    """The kernel autotuned over ``configs`` (pruned per dtype by ``prune``) keyed on
    ``(H, V, ROWS)`` (the autotuner adds the dtypes of tensor arguments), results kept in
    Triton's on-disk cache where the installed Triton can; under the interpreter, the kernel
    itself (launched with explicit blocks). Shared with :mod:`.triton_tma_tiles`."""
    if _INTERPRET:
        return kernel
    extra = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = True
    return triton.autotune(
        configs=configs,
        key=["H", "V", "ROWS"],
        prune_configs_by={"early_config_prune": prune},
        **extra,
    )(kernel)


_forward_launcher = autotuned(_EVEN_K(_forward_kernel), _CONFIGS, _configs_for_dtype)
_dlogits_launcher = autotuned(_EVEN_K(_dlogits_kernel), _CONFIGS, _configs_for_dtype)
_LAUNCH_CONFIG = _INTERPRETER_CONFIG if _INTERPRET else {}
# Shapes whose forward was already tuned on a prefix (see forward()).
_tuned_on_prefix: set[tuple] = set()


def check_dtype(rows: torch.Tensor) -> None:
    if rows.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f'backend="triton": expected float32, bfloat16 or float16 hidden states and weight, '
            f'got {rows.dtype}; use backend="torch" for float64 (e.g. torch.autograd.gradcheck)'
        )


def device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def merge_splits(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` from the ``(3, splits, N)`` partials, in a fixed order:
    ``lse = M + log(sum over splits of sum_s * exp(max_s - M))`` with ``M`` the largest split max;
    exactly one split holds each target logit, the others hold 0."""
    split_max, split_sum, split_target = partial
    top = split_max.amax(0)
    lse = top + torch.log((split_sum * torch.exp(split_max - top)).sum(0))
    return split_target.sum(0) - lse, lse


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
        rows: ``(N, H)`` gathered response hidden states: float32, bfloat16 or float16.
        weight: ``(V, H)`` lm_head weight, same dtype as ``rows`` (any strides).
        bias: ``(V,)`` float tensor or None.
        targets: ``(N,)`` integer target ids in ``[0, V)`` (others match no column).
        tiles: from :func:`default_tiles`; ``tiles.splits`` vocabulary splits.
        save_logits: keep the float32 logits of columns ``[0, tiles.saved_columns)``.
    Returns:
        ``(logp, lse, saved)``: ``(N,)`` float32 log-probs and log-sum-exps, and the
        ``(N, saved_columns)`` float32 saved logits (None if none).
    """
    check_dtype(rows)
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]
    edge = min(tiles.saved_columns, vocab) if save_logits else 0
    saved = torch.empty((n_rows, edge), dtype=torch.float32, device=rows.device) if edge else None
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.device)
        return empty, empty.clone(), saved
    shape_key = (hidden, vocab, rows.dtype, weight.stride(), bias is not None, tiles.dot_precision)
    if not _INTERPRET and n_rows > TUNE_ROWS_CAP and shape_key not in _tuned_on_prefix:
        # Tune the capped bucket on a prefix: the full call then reuses its configs.
        forward(rows[:TUNE_ROWS_CAP], weight, bias, targets[:TUNE_ROWS_CAP],
                temperature=temperature, tiles=tiles)  # fmt: skip
        _tuned_on_prefix.add(shape_key)
    cols_per_split, splits = split_columns(vocab, tiles.splits)
    partial = torch.empty((3, splits, n_rows), dtype=torch.float32, device=rows.device)

    def grid(meta: dict) -> tuple[int, int]:  # BLOCK_N comes from the (autotuned) config
        return triton.cdiv(n_rows, meta["BLOCK_N"]), splits

    with device_of(rows):
        _forward_launcher[grid](
            rows,
            weight,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            targets.contiguous(),
            partial,
            saved if saved is not None else partial,  # never written without SAVE_LOGITS
            n_rows,
            vocab,
            hidden,
            rows_bucket(n_rows),
            cols_per_split,
            edge,
            rows.stride(0),
            rows.stride(1),
            weight.stride(0),
            weight.stride(1),
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            SAVE_LOGITS=saved is not None,
            DOT_PRECISION=tiles.dot_precision,
            DOT_IN_FP32=_INTERPRET and rows.dtype == torch.bfloat16,
            **_LAUNCH_CONFIG,
        )
    launch_counts["forward"] += 1
    logp, lse = merge_splits(partial)
    return logp, lse, saved


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
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    saved: torch.Tensor | None = None,
    recompute: Callable[..., None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. ``rows``, ``weight`` and ``bias``.

    :func:`_dlogits_kernel` (or, inside the columns of ``saved``, :func:`_saved_dlogits_kernel`)
    fills one reused ``dlogits`` buffer (input dtype) per tile; the shared tile loop of
    :mod:`.gradients` adds it into float32 accumulators with two GEMMs. Returns gradients in the
    dtypes of ``rows``, ``weight`` and ``bias`` (None where not needed). ``recompute`` replaces
    :func:`_fill_dlogits` (another Triton variant's tile kernel, same arguments).
    """
    check_dtype(rows)
    n_rows = rows.shape[0]
    token_tile = max(1, min(tiles.token_tile, n_rows))
    vocab_tile = max(1, min(tiles.vocab_tile, weight.shape[0]))
    edge = saved.shape[1] if saved is not None else 0
    buffer = torch.empty(token_tile * vocab_tile, dtype=rows.dtype, device=rows.device)
    block_max = None
    if tiles.skip_threshold > 0:
        block_max = torch.empty(
            triton.cdiv(token_tile, _MIN_BLOCK) * triton.cdiv(vocab_tile, _MIN_BLOCK),
            dtype=torch.float32,
            device=rows.device,
        )
    grad_logp, targets, lse = grad_logp.contiguous(), targets.contiguous(), lse.contiguous()

    def fill(t0: int, t1: int, v0: int, v1: int) -> torch.Tensor | None:
        dlogits = buffer[: (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0)
        if block_max is not None:
            block_max.zero_()  # blocks of the last, narrower tiles leave the tail untouched
        common = dict(temperature=temperature, block_max=block_max)
        if v1 <= edge:
            _fill_saved_dlogits(dlogits, saved, grad_logp, targets, lse, t0, v0, **common)
        else:
            (recompute or _fill_dlogits)(
                dlogits, grad_logp, rows, weight, bias, targets, lse, t0, v0,
                dot_precision=tiles.dot_precision, **common,
            )  # fmt: skip
        if block_max is not None and block_max.max().item() < tiles.skip_threshold:
            launch_counts["skipped_tiles"] += 1
            return None
        return dlogits

    return accumulate_gradients(
        rows,
        weight,
        bias,
        fill,
        tiles=replace(tiles, token_tile=token_tile, vocab_tile=vocab_tile, saved_columns=edge),
        needs_grad=needs_grad,
        acc_dtype=torch.float32,
        dlogits_dtype=rows.dtype,
    )


def _fill_dlogits(
    dlogits: torch.Tensor,
    grad_logp: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    t0: int,
    v0: int,
    *,
    temperature: float,
    block_max: torch.Tensor | None,
    dot_precision: str,
) -> None:
    """Launch :func:`_dlogits_kernel` for the tile starting at ``(t0, v0)`` of the shape of
    ``dlogits`` (any row stride)."""
    n_tile, v_tile = dlogits.shape
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_tile, meta["BLOCK_N"]), triton.cdiv(v_tile, meta["BLOCK_V"])

    with device_of(rows):
        _dlogits_launcher[grid](
            rows,
            weight,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            targets,
            lse,
            grad_logp,
            dlogits,
            block_max if block_max is not None else lse,  # never written without TRACK_MAX
            n_rows,
            vocab,
            hidden,
            rows_bucket(n_tile),
            t0,
            t0 + n_tile,
            v0,
            v0 + v_tile,
            rows.stride(0),
            rows.stride(1),
            weight.stride(0),
            weight.stride(1),
            dlogits.stride(0),
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            TRACK_MAX=block_max is not None,
            DOT_PRECISION=dot_precision,
            DOT_IN_FP32=_INTERPRET and rows.dtype == torch.bfloat16,
            **_LAUNCH_CONFIG,
        )
    launch_counts["dlogits"] += 1


def _fill_saved_dlogits(
    dlogits: torch.Tensor,
    saved: torch.Tensor,
    grad_logp: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    t0: int,
    v0: int,
    *,
    temperature: float,
    block_max: torch.Tensor | None,
) -> None:
    """Launch :func:`_saved_dlogits_kernel` for the tile starting at ``(t0, v0)`` of the shape of
    ``dlogits``, reading the forward's logits from ``saved``."""
    n_tile, v_tile = dlogits.shape
    grid = (
        triton.cdiv(n_tile, _SAVED_BLOCK["BLOCK_N"]),
        triton.cdiv(v_tile, _SAVED_BLOCK["BLOCK_V"]),
    )
    with device_of(saved):
        _saved_dlogits_kernel[grid](
            saved,
            targets,
            lse,
            grad_logp,
            dlogits,
            block_max if block_max is not None else lse,  # never written without TRACK_MAX
            t0,
            t0 + n_tile,
            v0,
            v0 + v_tile,
            saved.stride(0),
            dlogits.stride(0),
            1.0 / temperature,
            TRACK_MAX=block_max is not None,
            num_warps=4,
            **_SAVED_BLOCK,
        )
    launch_counts["saved_dlogits"] += 1
