"""Persistent TMA variant of the Triton backend (``backend="triton_tma"``, Hopper and newer).

Same math, interface, saved-logits option, tolerances and backward tile loop as
:mod:`.triton_tiles`; what differs is how the two GEMM-shaped kernels feed the tensor cores:

* **TMA loads.** Row and weight blocks come in through tensor descriptors (the hardware copy
  engine writes them into shared memory; out-of-range rows, columns and ``H`` are zero-filled by
  it), instead of tensors of per-element pointers and masks. The compile report
  (``benchmarks/results/compile/``, sm_90) shows what that saves: the ``128x128x64`` forward
  drops from 220 (Triton 3.9) / 227 (3.6) registers per thread to 184 / 159, the ``64x64x64`` one
  from 143 / 128 to 96 / 78, and with Triton 3.6 the 4-warp ``64x128x64`` one fits three CTAs
  per SM instead of two.
* **A persistent forward.** The grid is a fixed number of programs per SM; each walks its share of
  the ``(row block, vocabulary split)`` work items, consecutive programs taking consecutive row
  blocks of one split (so they read the same weight columns while they are in L2). There is no
  tail of half-empty waves.

The backward's tile kernel (:func:`_tma_dlogits_kernel`) uses TMA loads too; saved tiles and the
gradient GEMMs are :mod:`.triton_tiles`' and :mod:`.gradients`'. TMA needs 16-byte aligned bases
and row strides and a unit inner stride: ``rows`` is always contiguous here, and a weight that is
not (a tied embedding seen transposed, say), an ``H`` whose rows are not a multiple of 16 bytes,
or a GPU before sm_90 makes a call fall back to the pointer kernels of :mod:`.triton_tiles`
(:func:`pointer_fallback`). It is not the default: ``"auto"`` stays on the
pointer kernels until the GPU check (``benchmarks/gpu_check.py``, which times both) shows this
one faster at the shapes that matter. Under ``TRITON_INTERPRET=1`` the descriptors are emulated
(Triton 3.9's interpreter; 3.6's does not run this kernel), which is how the tests check it.

Tuning: the descriptors' block shapes follow the config being timed through a pre-hook, and
Triton keeps no on-disk record of a tuning whose configs have pre-hooks: each new process tunes
these kernels again on first use of a shape (a few seconds per ``(H, V, rows bucket, flags)``
key: every candidate is compiled once, then timed), where the pointer kernels reuse the disk
cache.

FLOPs and memory: as :mod:`.triton_tiles`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs as configs
from . import triton_tiles as pointer
from .tiles import KernelOptions, Tiles
from .triton_kernels import dlogits_epilogue, fold_tile, load_bias, round_to, store_partials

__all__ = [
    "backward",
    "default_tiles",
    "forward",
    "launch_tma_dlogits",
    "launch_tma_forward",
    "pointer_fallback",
    "tma_compatible",
]

# Programs per SM of the persistent forward: 8-warp configs fit one CTA per SM, 4-warp ones two
# or three (compile report); the grid asks for what the config's shape suggests.
_BIG_TILE = 128 * 128


def _set_block_shapes(nargs: dict) -> None:
    """Autotuning pre-hook: the descriptors' block shapes follow the config being tried."""
    nargs["rows_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["weight_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_K"]]


def _with_hook(configs_: list) -> list:
    return [
        triton.Config(
            c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_block_shapes
        )
        for c in configs_
    ]


TMA_CONFIGS = _with_hook(configs.CONFIGS)


def tma_compatible(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether TMA descriptors can address ``rows`` and ``weight`` (16-byte aligned bases and row
    strides, unit inner stride) and the device has TMA (sm_90+; always under the interpreter)."""
    if not configs.INTERPRET and not (
        rows.is_cuda and torch.cuda.get_device_capability(rows.device)[0] >= 9
    ):
        return False
    for t in (rows, weight):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def default_tiles(
    n_rows: int,
    hidden: int,
    vocab: int,
    device: torch.device,
    chunk_size: int | tuple[int, int] | None,
    options: KernelOptions | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tiles:
    """As :func:`.triton_tiles.default_tiles` (the work items of the persistent grid are the same
    ``(row block, split)`` pairs)."""
    return pointer.default_tiles(n_rows, hidden, vocab, device, chunk_size, options, dtype)


@triton.jit
def _tma_logits_block(
    rows_desc,
    weight_desc,
    bias_ptr,
    row0,
    col0,
    cols,
    V,
    H,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    ROUND_HEAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(rows[row0 : row0 + BLOCK_N] @ weight[col0 : col0 + BLOCK_V].T + bias) *
    inv_temperature`` in float32 registers; out-of-range rows, columns and ``H`` read as 0. With
    ``ROUND_HEAD`` a float32 weight block is rounded to the rows' dtype before the dot."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        h = rows_desc.load([row0, k0])
        w = weight_desc.load([col0, k0])
        if ROUND_HEAD:
            w = round_to(w, h.dtype, DOT_IN_FP32)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w.T, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = load_bias(bias_ptr, cols, cols < V, rows_desc.dtype, ROUND_HEAD, DOT_IN_FP32)
        acc += bias[None, :]
    return acc * inv_temperature


@triton.jit
def _tma_forward_kernel(
    rows_desc,
    weight_desc,
    bias_ptr,
    targets_ptr,
    partial_ptr,
    saved_ptr,
    N,
    V,
    H,
    ROWS,
    cols_per_split,
    n_splits,
    saved_cols,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    ROUND_HEAD: tl.constexpr,
    SAVE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ROWS_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`.triton_kernels.forward_kernel` as a persistent kernel: program ``p`` handles work
    items ``p, p + programs, ...`` of the ``row blocks x n_splits`` items, item ``i`` being row
    block ``i % row_blocks`` of split ``i // row_blocks``."""
    row_blocks = tl.cdiv(N, BLOCK_N)
    items = row_blocks * n_splits
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        pid_n = item % row_blocks
        split = item // row_blocks
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        target = tl.load(targets_ptr + offs_n, mask=row_ok, other=-1)
        v_start = split * cols_per_split
        v_end = tl.minimum(v_start + cols_per_split, V)
        run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_N,), tl.float32)
        target_logit = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            logits = _tma_logits_block(
                rows_desc, weight_desc, bias_ptr, pid_n * BLOCK_N, v0, cols, V, H,
                inv_temperature, HAS_BIAS, ROUND_HEAD, DOT_PRECISION, DOT_IN_FP32,
                BLOCK_N, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            run_max, run_sum, target_logit = fold_tile(
                logits, cols, v_end, offs_n, row_ok, target, run_max, run_sum, target_logit,
                saved_ptr, saved_cols, SAVE_LOGITS,
            )  # fmt: skip
        store_partials(
            partial_ptr, split, n_splits, N, offs_n, row_ok, run_max, run_sum, target_logit
        )


@triton.jit
def _tma_dlogits_kernel(
    rows_desc,
    weight_desc,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    grad_ptr,
    dlogits_ptr,
    block_max_ptr,
    V,
    H,
    ROWS,
    t0,
    t_end,
    v0,
    v_end,
    stride_dn,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    ROUND_HEAD: tl.constexpr,
    TRACK_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ROWS_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`.triton_kernels.dlogits_kernel` with TMA loads."""
    row0 = t0 + tl.program_id(0) * BLOCK_N
    col0 = v0 + tl.program_id(1) * BLOCK_V
    offs_n = row0 + tl.arange(0, BLOCK_N)
    cols = col0 + tl.arange(0, BLOCK_V)
    logits = _tma_logits_block(
        rows_desc, weight_desc, bias_ptr, row0, col0, cols, V, H, inv_temperature,
        HAS_BIAS, ROUND_HEAD, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    dlogits_epilogue(
        logits, offs_n, cols, offs_n < t_end, cols < v_end, t0, v0, targets_ptr, lse_ptr,
        grad_ptr, dlogits_ptr, block_max_ptr, stride_dn, inv_temperature, TRACK_MAX,
    )  # fmt: skip


FORWARD_LAUNCHER = configs.autotuned(
    _tma_forward_kernel, TMA_CONFIGS, configs.CONFIGS, name="tma_forward"
)
DLOGITS_LAUNCHER = configs.autotuned(
    _tma_dlogits_kernel, TMA_CONFIGS, configs.CONFIGS, name="tma_dlogits"
)


def _descriptor(tensor: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(tensor, block)


def _blocks() -> dict[str, int]:
    """Block sizes the descriptors start with (autotuning resets them per config)."""
    if configs.INTERPRET:
        return dict(configs.INTERPRETER_CONFIG)
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 64}


def _descriptors(rows: torch.Tensor, weight: torch.Tensor) -> tuple:
    blocks = _blocks()
    return (
        _descriptor(rows, [blocks["BLOCK_N"], blocks["BLOCK_K"]]),
        _descriptor(weight, [blocks["BLOCK_V"], blocks["BLOCK_K"]]),
    )


def _programs(items: int, meta: dict, device: torch.device) -> int:
    """Persistent grid size: one program per SM for big tiles, two for small ones (capped by the
    work items); under the interpreter, three programs, so that each walks several items."""
    if configs.INTERPRET or device.type != "cuda":
        return min(items, 3)
    per_sm = 1 if meta["BLOCK_N"] * meta["BLOCK_V"] >= _BIG_TILE else 2
    return min(items, per_sm * pointer.sm_count(device))


def launch_tma_forward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    partial: torch.Tensor,
    saved: torch.Tensor | None,
    cols_per_split: int,
    splits: int,
    saved_cols: int,
    temperature: float,
    tiles: Tiles,
) -> None:
    """Launch :func:`_tma_forward_kernel` (the persistent grid); arguments as
    :func:`.triton_tiles.launch_forward`."""
    n_rows, hidden = rows.shape
    rows_desc, weight_desc = _descriptors(rows, weight)

    def grid(meta: dict) -> tuple[int]:
        items = triton.cdiv(n_rows, meta["BLOCK_N"]) * splits
        return (_programs(items, meta, rows.device),)

    FORWARD_LAUNCHER[grid](
        rows_desc,
        weight_desc,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        targets,
        partial,
        saved if saved is not None else partial,  # never written without SAVE_LOGITS
        n_rows,
        weight.shape[0],
        hidden,
        configs.rows_bucket(n_rows),
        cols_per_split,
        splits,
        saved_cols,
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        ROUND_HEAD=pointer.round_head(rows, weight),
        SAVE_LOGITS=saved is not None,
        DOT_PRECISION=tiles.dot_precision,
        DOT_IN_FP32=pointer.dot_in_fp32(rows),
        ROWS_DTYPE=str(rows.dtype),
        **configs.LAUNCH_CONFIG,
    )


def pointer_fallback(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The pointer kernels' forward, for operands TMA cannot address (:func:`tma_compatible`)."""
    return pointer.forward(rows, weight, bias, targets, **kwargs)


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
    """As :func:`.triton_tiles.forward`, with the persistent TMA kernel (or the pointer kernel
    when :func:`tma_compatible` says no)."""
    pointer.check_dtype(rows, weight)
    if not tma_compatible(rows, weight):
        return pointer_fallback(
            rows, weight, bias, targets, temperature=temperature, tiles=tiles,
            save_logits=save_logits,
        )  # fmt: skip
    return pointer.run_forward(
        launch_tma_forward, rows, weight, bias, targets, temperature=temperature, tiles=tiles,
        save_logits=save_logits, tuning_key=("tma", rows.shape[1], weight.shape[0]),
    )  # fmt: skip


def launch_tma_dlogits(
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
    """:func:`.triton_tiles.launch_dlogits` with :func:`_tma_dlogits_kernel`."""
    n_tile, v_tile = dlogits.shape
    rows_desc, weight_desc = _descriptors(rows, weight)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_tile, meta["BLOCK_N"]), triton.cdiv(v_tile, meta["BLOCK_V"])

    with pointer.device_of(rows):
        DLOGITS_LAUNCHER[grid](
            rows_desc,
            weight_desc,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            targets,
            lse,
            grad_logp,
            dlogits,
            block_max if block_max is not None else lse,  # never written without TRACK_MAX
            weight.shape[0],
            rows.shape[1],
            configs.rows_bucket(n_tile),
            t0,
            t0 + n_tile,
            v0,
            v0 + v_tile,
            dlogits.stride(0),
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            ROUND_HEAD=pointer.round_head(rows, weight),
            TRACK_MAX=block_max is not None,
            DOT_PRECISION=dot_precision,
            DOT_IN_FP32=pointer.dot_in_fp32(rows),
            ROWS_DTYPE=str(rows.dtype),
            **configs.LAUNCH_CONFIG,
        )


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """As :func:`.triton_tiles.backward`, recomputing tiles with :func:`_tma_dlogits_kernel`
    (the pointer kernel when :func:`tma_compatible` says no)."""
    recompute = launch_tma_dlogits if tma_compatible(rows, weight) else None
    return pointer.backward(
        grad_logp, rows, weight, bias, targets, lse, temperature=temperature, tiles=tiles,
        needs_grad=needs_grad, saved=saved, recompute=recompute,
    )  # fmt: skip
