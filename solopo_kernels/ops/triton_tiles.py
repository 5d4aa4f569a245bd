"""Triton forward and backward of per-token log-probs (the CUDA path; CPU under the interpreter).

Same interface and semantics as :mod:`.torch_tiles`: ``logits = (rows @ weight.T + bias) /
temperature`` over gathered response rows ``(N, H)`` and the lm_head ``weight (V, H)``;
``logp = logits[target] - logsumexp(logits)``.

Forward (one kernel, split-V, no logits in global memory)
    Program ``(row block, split)`` owns ``BLOCK_N`` rows and a contiguous range of the vocabulary
    (its *split*). It walks the split in ``BLOCK_V``-column tiles; each logits tile is a ``tl.dot``
    K-loop over ``H`` with float32 accumulation, bias and ``1 / temperature`` applied in registers,
    folded into a running max and a rescaled sum of exponentials, and the target logit is picked up
    when the target id falls in the tile. Only three float32 numbers per (split, row) are written,
    into a ``(3, splits, N)`` buffer; a few torch ops merge the splits (``O(splits * N)``, a fixed
    order: deterministic, no atomics, no locks). Splitting the vocabulary keeps the GPU full when
    the rows alone give too few programs (``N = 2048`` is 16 row blocks for 132 SMs).

Backward (a Triton tile kernel + cuBLAS GEMMs; exact by default)
    For a ``[token_tile, vocab_tile]`` tile, :func:`_dlogits_kernel` recomputes the logits (same
    ``tl.dot`` K-loop) and writes ``dlogits = g * (onehot - exp(logits - lse)) / temperature``,
    computed in float32 and stored in the input dtype, into one reused buffer. Then
    ``grad_rows += dlogits @ W_tile`` and ``grad_weight_tile += dlogits^T @ rows_tile`` run as
    tensor-core GEMMs that accumulate in float32 (``grad_bias`` is a float32 column sum). Why this
    and not a fully fused backward: a fused kernel must reduce ``grad_rows`` over ``V`` and
    ``grad_weight`` over ``N``; without atomics that takes two kernels that each recompute the
    logits (10 NHV FLOPs instead of the 8 NHV budget, see docs/kernels.md), and with atomics it is
    non-deterministic. Here the recompute is fused (the logits never reach memory, only the
    ``dlogits`` tile does: one 2-byte write and two reads per element, versus ~14 B for a
    GEMM-into-tile design), the two gradient GEMMs run at cuBLAS speed, and the result is
    deterministic. Memory beyond the gradients: one ``token_tile x vocab_tile`` tile (at most
    ``2**26`` elements by default), a float32 ``(N, H)`` ``grad_rows`` accumulator and a float32
    ``(vocab_tile, H)`` weight-gradient accumulator for 16-bit weights.

    ``dlogits`` is rounded to bf16/fp16 for 16-bit inputs *after* the softmax is formed in float32
    (the logits themselves are never rounded), and every product is summed in float32: the GEMMs
    accumulate in float32 and, on CUDA, add into float32 accumulators without an intermediate
    16-bit rounding (``torch.addmm(..., out_dtype=torch.float32)``; operands are up-cast where that
    is unavailable, e.g. the interpreter's CPU tensors). fp16 inputs need ``|g| / temperature``
    inside the fp16 range (65504); the losses here give ``|g|`` of order ``beta`` and ``alpha``.

Opt-in gradient filtering (CCE-style), :func:`skip_negligible_tiles`
    Skips the GEMMs of a ``[token_tile, vocab_tile]`` tile whose every ``|dlogits|`` is below a
    threshold ``eps`` (one host sync per tile). Values are unaffected; the gradient error is
    bounded by what is dropped: ``|d grad_rows[i, k]| <= eps * (skipped columns) * max|W|``,
    ``|d grad_weight[v, k]| <= eps * N * max|rows|``, ``|d grad_bias[v]| <= eps * N``. It pays only
    with tiles small enough to be uniformly negligible (set them with ``chunk_size``). Off by default.

Dtypes: float32, bfloat16 and float16 (float64: use the torch backend). float32 ``tl.dot`` runs in
IEEE float32 unless ``torch.set_float32_matmul_precision`` allows TF32, as for torch's GEMMs.

Tolerances (what the tests check against the float64 reference computed from the same inputs,
as ``max |err| / max |ref|``): float32: values and gradients <= 1e-5; bfloat16/float16: values
<= 1e-5, gradients <= 1e-2 (the gradients are returned in the input dtype).

Block sizes: on CUDA a small ``triton.autotune`` set keyed on ``(H, V)`` and the tensor dtypes; under
``TRITON_INTERPRET=1`` one fixed small config. ``TRITON_INTERPRET`` must be set before this module
(and Triton) is imported. :data:`launch_counts` counts kernel launches, so tests can tell that the
Triton path really ran.

FLOPs: forward ``2 N H V``; backward ``6 N H V`` (recomputed logits, ``grad_rows``, ``grad_weight``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gradients import accumulate_gradients

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = tl.constexpr(1.4426950408889634)

# Kernel launches by kind ("forward", "dlogits") and tiles skipped by the opt-in filter
# ("skipped_tiles"). Tests read it to tell that the Triton path ran.
launch_counts: Counter[str] = Counter()

# On a GPU: a small set of matmul-shaped configs (the kernels are GEMMs with a reduction
# epilogue), autotuned once per (H, V, dtypes). Under the interpreter: one small fixed config
# (autotuning there only burns time; tl.dot wants every block dimension >= 16).
_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}
_MAX_BLOCK_N = 16 if _INTERPRET else max(c.kwargs["BLOCK_N"] for c in _CONFIGS)
# The smallest BLOCK_N / BLOCK_V of any config: sizes the per-block max buffer of tile skipping.
_MIN_BLOCK = (
    16 if _INTERPRET else min(min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in _CONFIGS)
)
# Vocabulary splits are whole multiples of every BLOCK_V, so no tile straddles two splits.
_SPLIT_ALIGN = 32 if _INTERPRET else max(c.kwargs["BLOCK_V"] for c in _CONFIGS)
# A split spans at least this many columns, so per-split overhead (program start, three partial
# stores) stays negligible next to its matmul work.
_MIN_SPLIT_COLUMNS = 4096
# Target number of forward programs per SM: enough waves that the last one is not mostly idle.
_PROGRAMS_PER_SM = 4
# Default size of the backward dlogits tile, in elements (128 MiB in bf16). Under the interpreter
# tiles are tiny anyway; tests pick multi-tile shapes through chunk_size.
_DLOGITS_ELEMENTS = 1 << 14 if _INTERPRET else 1 << 26
# The token tile never exceeds this: past it the GEMMs are already large, and a bigger vocab tile
# means fewer passes over rows.
_MAX_TOKEN_TILE = 8192

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_skip_threshold = 0.0


@dataclass(frozen=True)
class Tiles:
    """Launch geometry of one call, fixed at forward time and reused by its backward.

    Attributes:
        token_tile, vocab_tile: shape of the backward ``dlogits`` tile (rows, vocabulary columns).
        splits: number of vocabulary splits of the forward grid (the merge reads ``splits x N``).
        skip_threshold: opt-in gradient filter (see :func:`skip_negligible_tiles`); 0 = exact.
    """

    token_tile: int
    vocab_tile: int
    splits: int
    skip_threshold: float = 0.0


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


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """Enough vocabulary splits that ``row blocks x splits`` fills the GPU a few times over;
    1 under the interpreter (tests ask for more explicitly)."""
    if _INTERPRET or device.type != "cuda":
        return 1
    sms = _sm_count(device)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, triton.cdiv(max(1, n_rows), _MAX_BLOCK_N))
    return max(1, min(wanted, vocab // _MIN_SPLIT_COLUMNS))


def default_tiles(
    n_rows: int,
    hidden: int,
    vocab: int,
    device: torch.device,
    chunk_size: int | tuple[int, int] | None,
) -> Tiles:
    """Tiles for ``n_rows`` gathered rows against a ``(vocab, hidden)`` weight.

    The forward keeps no tile in memory, so ``chunk_size`` shapes only the backward ``dlogits``
    tile: an int sets its token rows, a pair ``(tokens, vocab columns)`` sets both. By default the
    token tile holds every row up to ``_MAX_TOKEN_TILE`` and the vocab tile fills the rest of the
    ``_DLOGITS_ELEMENTS`` budget (a multiple of the block width, at least one block).
    """
    if isinstance(chunk_size, tuple):
        token_tile, vocab_tile = chunk_size
    else:
        token_tile = chunk_size if chunk_size is not None else min(max(1, n_rows), _MAX_TOKEN_TILE)
        vocab_tile = max(
            _SPLIT_ALIGN, _DLOGITS_ELEMENTS // token_tile // _SPLIT_ALIGN * _SPLIT_ALIGN
        )
    return Tiles(
        token_tile=max(1, min(token_tile, n_rows)),
        vocab_tile=min(vocab_tile, vocab),
        splits=_vocab_splits(n_rows, vocab, device),
        skip_threshold=_skip_threshold,
    )


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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(rows[offs_n] @ weight[cols].T + bias[cols]) * inv_temperature``: a float32
    ``[BLOCK_N, BLOCK_V]`` block that lives in registers. Loads are masked by the tensor bounds
    (rows past ``N`` and columns past ``V`` read as 0), so every entry is finite and nothing is
    read out of bounds; callers mask what they reduce or store. ``DOT_IN_FP32`` (interpreter
    only) feeds bf16 operands to ``tl.dot`` up-cast to float32, exactly: the interpreter has no
    bf16 dot and would multiply the raw bit patterns (triton-lang/triton#11584)."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    col_ok = cols < V
    # int64 row offsets: V * H passes 2**31 for large vocabularies (256K x 8192).
    row_ptrs = rows_ptr + offs_n.to(tl.int64)[:, None] * stride_rn + offs_k[None, :] * stride_rh
    # The weight tile is loaded K-major, [BLOCK_K, BLOCK_V], ready for tl.dot.
    w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_k[:, None] * stride_wh
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        h = tl.load(row_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        row_ptrs += BLOCK_K * stride_rh
        w_ptrs += BLOCK_K * stride_wh
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
    N,
    V,
    H,
    cols_per_split,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (row block, split): running max, sum of ``exp(logit - max)`` and the target logit
    over the split's columns, stored at ``partial[0 | 1 | 2, split, rows]`` (float32)."""
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
            HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        in_split = (cols < v_end)[None, :]
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

    out = partial_ptr + split * N + offs_n
    splits_x_n = tl.num_programs(1) * N
    tl.store(out, run_max, mask=row_ok)
    tl.store(out + splits_x_n, run_sum, mask=row_ok)
    tl.store(out + 2 * splits_x_n, target_logit, mask=row_ok)


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
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dlogits[t - t0, v - v0] = g[t] * (onehot - softmax)[t, v] / temperature`` for the tile
    ``[t0, t_end) x [v0, v_end)``, formed in float32 and stored in ``dlogits``' dtype. With
    ``TRACK_MAX``, each program also stores its block's ``max |dlogits|`` (for tile skipping)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = t0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < t_end
    col_ok = cols < v_end
    logits = _logits_block(
        rows_ptr, weight_ptr, bias_ptr, offs_n, cols, N, V, H,
        stride_rn, stride_rh, stride_wv, stride_wh, inv_temperature,
        HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    target = tl.load(targets_ptr + offs_n, mask=row_ok, other=-1)
    scale = tl.load(grad_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32) * inv_temperature
    prob = tl.exp2((logits - lse[:, None]) * _LOG2E)
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    dlogits = scale[:, None] * (onehot - prob)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    out = dlogits_ptr + (offs_n - t0)[:, None] * stride_dn + (cols - v0)[None, :]
    tl.store(out, dlogits.to(dlogits_ptr.dtype.element_ty), mask=tile_ok)
    if TRACK_MAX:
        block_max = tl.max(tl.max(tl.where(tile_ok, tl.abs(dlogits), 0.0), axis=1), axis=0)
        tl.store(block_max_ptr + pid_n * tl.num_programs(1) + pid_v, block_max)


def _tuned(kernel: triton.JITFunction) -> triton.JITFunction:
    """The kernel autotuned over ``_CONFIGS`` keyed on ``(H, V)`` (the autotuner adds the dtypes
    of tensor arguments to the key); under the interpreter, the kernel itself (launched with
    ``_INTERPRETER_CONFIG``)."""
    return kernel if _INTERPRET else triton.autotune(configs=_CONFIGS, key=["H", "V"])(kernel)


_forward_launcher = _tuned(_forward_kernel)
_dlogits_launcher = _tuned(_dlogits_kernel)
_LAUNCH_CONFIG = _INTERPRETER_CONFIG if _INTERPRET else {}


def _check_dtype(rows: torch.Tensor) -> None:
    if rows.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f'backend="triton": expected float32, bfloat16 or float16 hidden states and weight, '
            f'got {rows.dtype}; use backend="torch" for float64 (e.g. torch.autograd.gradcheck)'
        )


def _device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products for float32 inputs unless torch allows TF32 for its own matmuls
    (``torch.set_float32_matmul_precision("high")``); 16-bit inputs ignore the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def forward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    tiles: Tiles,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row target log-prob and log-sum-exp.

    Args:
        rows: ``(N, H)`` gathered response hidden states: float32, bfloat16 or float16.
        weight: ``(V, H)`` lm_head weight, same dtype as ``rows`` (any strides).
        bias: ``(V,)`` float tensor or None.
        targets: ``(N,)`` integer target ids in ``[0, V)`` (others match no column).
        tiles: from :func:`default_tiles`; ``tiles.splits`` vocabulary splits.
    Returns:
        ``(logp, lse)``, both ``(N,)`` float32.
    """
    _check_dtype(rows)
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.device)
        return empty, empty.clone()
    cols_per_split = triton.cdiv(triton.cdiv(vocab, tiles.splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(vocab, cols_per_split)  # no empty split after rounding up
    partial = torch.empty((3, splits, n_rows), dtype=torch.float32, device=rows.device)

    def grid(meta: dict) -> tuple[int, int]:  # BLOCK_N comes from the (autotuned) config
        return triton.cdiv(n_rows, meta["BLOCK_N"]), splits

    with _device_of(rows):
        _forward_launcher[grid](
            rows,
            weight,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            targets.contiguous(),
            partial,
            n_rows,
            vocab,
            hidden,
            cols_per_split,
            rows.stride(0),
            rows.stride(1),
            weight.stride(0),
            weight.stride(1),
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=_dot_precision(rows.dtype),
            DOT_IN_FP32=_INTERPRET and rows.dtype == torch.bfloat16,
            **_LAUNCH_CONFIG,
        )
    launch_counts["forward"] += 1
    # Merge the splits in a fixed order: lse = M + log(sum over splits of sum_s * exp(max_s - M))
    # with M the largest split max; exactly one split holds each target logit, the others hold 0.
    split_max, split_sum, split_target = partial
    top = split_max.amax(0)
    lse = top + torch.log((split_sum * torch.exp(split_max - top)).sum(0))
    return split_target.sum(0) - lse, lse


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp)`` w.r.t. ``rows``, ``weight`` and ``bias``.

    :func:`_dlogits_kernel` fills one reused ``dlogits`` buffer (input dtype) per tile; the shared
    tile loop of :mod:`.gradients` adds it into float32 accumulators with two GEMMs. Returns
    gradients in the dtypes of ``rows``, ``weight`` and ``bias`` (None where not needed).
    """
    _check_dtype(rows)
    n_rows = rows.shape[0]
    token_tile, vocab_tile = (
        max(1, min(tiles.token_tile, n_rows)),
        min(tiles.vocab_tile, weight.shape[0]),
    )
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
        kept = _fill_dlogits(
            dlogits, grad_logp, rows, weight, bias, targets, lse, t0, v0,
            temperature=temperature, block_max=block_max, threshold=tiles.skip_threshold,
        )  # fmt: skip
        return dlogits if kept else None

    return accumulate_gradients(
        rows,
        weight,
        bias,
        fill,
        tiles=(token_tile, vocab_tile),
        needs_grad=needs_grad,
        acc_dtype=torch.float32,
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
    threshold: float,
) -> bool:
    """Launch :func:`_dlogits_kernel` for the tile starting at ``(t0, v0)`` of the shape of
    ``dlogits``. Returns False when tile skipping is on and the whole tile is below the threshold
    (then its GEMMs are skipped)."""
    n_tile, v_tile = dlogits.shape
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]
    if block_max is not None:
        block_max.zero_()  # blocks of the last, narrower tiles leave the tail untouched

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_tile, meta["BLOCK_N"]), triton.cdiv(v_tile, meta["BLOCK_V"])

    with _device_of(rows):
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
            DOT_PRECISION=_dot_precision(rows.dtype),
            DOT_IN_FP32=_INTERPRET and rows.dtype == torch.bfloat16,
            **_LAUNCH_CONFIG,
        )
    launch_counts["dlogits"] += 1
    if block_max is not None and block_max.max().item() < threshold:
        launch_counts["skipped_tiles"] += 1
        return False
    return True
