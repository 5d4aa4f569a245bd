"""The Triton kernels of the log-prob backend (``@triton.jit`` code only; launched from
:mod:`.triton_tiles`, whose docstring explains the design). The building blocks that the TMA
variant (:mod:`.triton_tma_tiles`) shares are public: :func:`fold_tile` (the online
log-sum-exp fold of one logits tile), :func:`store_partials` and :func:`dlogits_epilogue`.

Every logits block is a float32 ``tl.dot`` K-loop over ``H``; loads are masked by the tensor
bounds (rows past ``N``, columns past ``V`` and ``k`` past ``H`` read as 0), so every entry is
finite and nothing is read out of bounds; callers mask what they reduce or store. Offsets that
can pass ``2**31`` (rows x strides, weight columns x strides, the ``k`` steps of a transposed
weight, ``splits x N``, a user tile of ``tokens x columns``) are int64.

Integer arguments keep Triton's specialisation (divisibility by 16 known at compile time):
without it the address arithmetic costs registers; the compile report measured 220 -> 234
registers for the 128x128x64 forward, and spills once it saves logits (Triton 3.9). The price is
a few compiled variants per kernel (a ragged N or V is "not divisible by 16").
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "dlogits_epilogue",
    "dlogits_kernel",
    "even_k",
    "fold_tile",
    "load_bias",
    "round_to",
    "forward_kernel",
    "saved_dlogits_kernel",
    "store_partials",
]

LOG2E = tl.constexpr(1.4426950408889634)

# EVEN_K: H is a multiple of BLOCK_K, so the K masks can go.
even_k = triton.heuristics({"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0})


@triton.jit
def logits_block(
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
    ROUND_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(rows[offs_n] @ weight[cols].T + bias[cols]) * inv_temperature``: a float32
    ``[BLOCK_N, BLOCK_V]`` block that lives in registers. ``ROUND_HEAD``: the weight (and bias)
    is float32 and the rows 16-bit: the loaded weight block is rounded to the rows' dtype before
    the dot, as autocast rounds the head (no copy of the weight exists anywhere). ``DOT_IN_FP32``
    (interpreter only) feeds bf16 operands to ``tl.dot`` up-cast to float32, exactly: the
    interpreter has no bf16 dot and would multiply the raw bit patterns (triton-lang/triton#11584)."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    col_ok = cols < V
    # int64 offsets: V * H passes 2**31 for large vocabularies (256K x 8192). They are rebuilt
    # from these vectors each step rather than carried as 2-D pointer tensors (fewer live
    # registers in the K-loop).
    row_off = offs_n.to(tl.int64) * stride_rn
    col_off = cols.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        h_ptrs = rows_ptr + row_off[:, None] + k[None, :] * stride_rh
        # The weight tile is loaded K-major, [BLOCK_K, BLOCK_V], ready for tl.dot. k * stride_wh
        # in int64: a transposed weight has stride_wh = V, and H * V can pass 2**31.
        w_ptrs = weight_ptr + col_off[None, :] + k.to(tl.int64)[:, None] * stride_wh
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = k < H
            h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if ROUND_HEAD:
            w = round_to(w, rows_ptr.dtype.element_ty, DOT_IN_FP32)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += load_bias(
            bias_ptr, cols, col_ok, rows_ptr.dtype.element_ty, ROUND_HEAD, DOT_IN_FP32
        )[None, :]
    return acc * inv_temperature


@triton.jit
def round_to(x, dtype: tl.constexpr, IN_SOFTWARE: tl.constexpr):
    """float32 ``x`` rounded to the 16-bit ``dtype`` (to nearest, ties to even, as the GPU's
    conversion does). ``IN_SOFTWARE`` (the interpreter with bf16 rows): the bits are rounded by
    hand and the result stays float32, because the interpreter truncates float32 -> bf16."""
    if IN_SOFTWARE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def load_bias(
    bias_ptr, cols, col_ok, rows_dtype, ROUND_HEAD: tl.constexpr, DOT_IN_FP32: tl.constexpr
):
    """``bias[cols]`` as float32 (0 past ``V``); rounded to ``rows_dtype`` first with
    ``ROUND_HEAD`` (a float32 head meeting 16-bit rows). The bias is contiguous (the dispatcher
    makes it so)."""
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
    if ROUND_HEAD:
        bias = round_to(bias, rows_dtype, DOT_IN_FP32)
    return bias.to(tl.float32)


@triton.jit
def fold_tile(
    logits,
    cols,
    v_end,
    offs_n,
    row_ok,
    target,
    run_max,
    run_sum,
    target_logit,
    saved_ptr,
    saved_cols,
    SAVE_LOGITS: tl.constexpr,
):
    """Fold one float32 logits tile (columns ``cols``, of which those ``< v_end`` belong to the
    split) into the running max, the rescaled sum of exponentials and the target logit of its
    rows; with ``SAVE_LOGITS`` the tile's columns ``< saved_cols`` also go to
    ``saved[row, col]``. Returns ``(run_max, run_sum, target_logit)``."""
    in_split = (cols < v_end)[None, :]
    if SAVE_LOGITS:
        kept = row_ok[:, None] & in_split & (cols < saved_cols)[None, :]
        out = saved_ptr + offs_n.to(tl.int64)[:, None] * saved_cols + cols[None, :]
        tl.store(out, logits, mask=kept)
    # The target column lies in one tile of one split; every other tile adds 0 here.
    hit = in_split & (cols[None, :] == target[:, None])
    target_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)
    logits = tl.where(in_split, logits, float("-inf"))
    # The running max of a row whose every column so far is -inf (a masked vocabulary tail, a
    # -inf bias at the start of a split) is still -inf, and exp(-inf - -inf) would be NaN: such
    # rows subtract 0 instead, so that their -inf columns add exp(-inf) = 0 and the (empty) sum is
    # rescaled by 0. Large finite masks (-1e30, finfo.min) need nothing: their exponentials are 1
    # while they are the max and 0 once a real logit arrives (the rescale underflows to 0).
    # exp(x) is computed as exp2(x * log2(e)) (the hardware op).
    new_max = tl.maximum(run_max, tl.max(logits, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    tile_sum = tl.sum(tl.exp2((logits - shift[:, None]) * LOG2E), axis=1)
    run_sum = run_sum * tl.exp2((run_max - shift) * LOG2E) + tile_sum
    return new_max, run_sum, target_logit


@triton.jit
def store_partials(
    partial_ptr, split, n_splits, N, offs_n, row_ok, run_max, run_sum, target_logit
):
    """A split's three per-row numbers into ``partial[0 | 1 | 2, split, rows]`` (float32)."""
    # int64: splits x N can pass 2**31 for a very long batch. tl.cast, not .to: an integer
    # argument equal to 1 is specialised into a constant, which has no .to.
    splits_x_n = tl.cast(n_splits, tl.int64) * N
    out = partial_ptr + split.to(tl.int64) * N + offs_n
    tl.store(out, run_max, mask=row_ok)
    tl.store(out + splits_x_n, run_sum, mask=row_ok)
    tl.store(out + 2 * splits_x_n, target_logit, mask=row_ok)


@triton.jit
def forward_kernel(
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
    ROUND_HEAD: tl.constexpr,
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
        logits = logits_block(
            rows_ptr, weight_ptr, bias_ptr, offs_n, cols, N, V, H,
            stride_rn, stride_rh, stride_wv, stride_wh, inv_temperature,
            HAS_BIAS, ROUND_HEAD, DOT_PRECISION, DOT_IN_FP32, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        run_max, run_sum, target_logit = fold_tile(
            logits, cols, v_end, offs_n, row_ok, target, run_max, run_sum, target_logit,
            saved_ptr, saved_cols, SAVE_LOGITS,
        )  # fmt: skip
    store_partials(
        partial_ptr, split, tl.num_programs(1), N, offs_n, row_ok, run_max, run_sum, target_logit
    )


@triton.jit
def dlogits_epilogue(
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
    prob = tl.exp2((logits - lse[:, None]) * LOG2E)
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
def dlogits_kernel(
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
    ROUND_HEAD: tl.constexpr,
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
    logits = logits_block(
        rows_ptr, weight_ptr, bias_ptr, offs_n, cols, N, V, H,
        stride_rn, stride_rh, stride_wv, stride_wh, inv_temperature,
        HAS_BIAS, ROUND_HEAD, DOT_PRECISION, DOT_IN_FP32, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    dlogits_epilogue(
        logits, offs_n, cols, offs_n < t_end, cols < v_end, t0, v0, targets_ptr, lse_ptr,
        grad_ptr, dlogits_ptr, block_max_ptr, stride_dn, inv_temperature, TRACK_MAX,
    )  # fmt: skip


@triton.jit
def saved_dlogits_kernel(
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
    """:func:`dlogits_kernel` for a tile inside the saved columns: the logits are read from the
    forward's float32 ``saved[row, col]`` (row stride ``stride_sn``) instead of recomputed."""
    offs_n = t0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < t_end
    col_ok = cols < v_end
    ptrs = saved_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + cols[None, :]
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    dlogits_epilogue(
        logits, offs_n, cols, row_ok, col_ok, t0, v0, targets_ptr, lse_ptr, grad_ptr,
        dlogits_ptr, block_max_ptr, stride_dn, inv_temperature, TRACK_MAX,
    )  # fmt: skip
