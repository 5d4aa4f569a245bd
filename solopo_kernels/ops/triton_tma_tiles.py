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
(counted in ``launch_counts["tma_fallback"]``). It is not the default: ``"auto"`` stays on the
pointer kernels until the GPU check (``benchmarks/gpu_check.py``, which times both) shows this
one faster at the shapes that matter. Under ``TRITON_INTERPRET=1`` the descriptors are emulated
(Triton 3.9's interpreter; 3.6's does not run this kernel), which is how the tests check it.

FLOPs and memory: as :mod:`.triton_tiles`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_tiles as base
from .tiles import KernelOptions, Tiles

__all__ = ["backward", "default_tiles", "forward", "tma_compatible"]

launch_counts = base.launch_counts
_INTERPRET = base._INTERPRET
_LOG2E = tl.constexpr(1.4426950408889634)

# Programs per SM of the persistent forward: 8-warp configs fit one CTA per SM, 4-warp ones two
# or three (compile report); the grid asks for what the config's shape suggests.
_BIG_TILE = 128 * 128


def _set_block_shapes(nargs: dict) -> None:
    """Autotuning pre-hook: the descriptors' block shapes follow the config being tried."""
    nargs["rows_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["weight_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_K"]]


def _with_hook(configs: list) -> list:
    return [
        triton.Config(
            c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_block_shapes
        )
        for c in configs
    ]


HALF_CONFIGS = _with_hook(base.HALF_CONFIGS)
FP32_CONFIGS = _with_hook(base.FP32_CONFIGS)
_CONFIGS = HALF_CONFIGS + FP32_CONFIGS


def tma_compatible(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether TMA descriptors can address ``rows`` and ``weight`` (16-byte aligned bases and row
    strides, unit inner stride) and the device has TMA (sm_90+; always under the interpreter)."""
    if not _INTERPRET and not (
        rows.is_cuda and torch.cuda.get_device_capability(rows.device)[0] >= 9
    ):
        return False
    size = rows.element_size()
    for t in (rows, weight):
        if t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
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
    return base.default_tiles(n_rows, hidden, vocab, device, chunk_size, options, dtype)


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
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(rows[row0 : row0 + BLOCK_N] @ weight[col0 : col0 + BLOCK_V].T + bias) *
    inv_temperature`` in float32 registers; out-of-range rows, columns and ``H`` read as 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        h = rows_desc.load([row0, k0])
        w = weight_desc.load([col0, k0])
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w.T, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
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
    SAVE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`.triton_tiles._forward_kernel` as a persistent kernel: program ``p`` handles work
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
                inv_temperature, HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            in_split = (cols < v_end)[None, :]
            if SAVE_LOGITS:
                kept = row_ok[:, None] & in_split & (cols < saved_cols)[None, :]
                out = saved_ptr + offs_n.to(tl.int64)[:, None] * saved_cols + cols[None, :]
                tl.store(out, logits, mask=kept)
            hit = in_split & (cols[None, :] == target[:, None])
            target_logit += tl.sum(tl.where(hit, logits, 0.0), axis=1)
            logits = tl.where(in_split, logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            tile_sum = tl.sum(tl.exp2((logits - new_max[:, None]) * _LOG2E), axis=1)
            run_sum = run_sum * tl.exp2((run_max - new_max) * _LOG2E) + tile_sum
            run_max = new_max
        splits_x_n = n_splits.to(tl.int64) * N
        out = partial_ptr + split.to(tl.int64) * N + offs_n
        tl.store(out, run_max, mask=row_ok)
        tl.store(out + splits_x_n, run_sum, mask=row_ok)
        tl.store(out + 2 * splits_x_n, target_logit, mask=row_ok)


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
    TRACK_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """:func:`.triton_tiles._dlogits_kernel` with TMA loads."""
    row0 = t0 + tl.program_id(0) * BLOCK_N
    col0 = v0 + tl.program_id(1) * BLOCK_V
    offs_n = row0 + tl.arange(0, BLOCK_N)
    cols = col0 + tl.arange(0, BLOCK_V)
    logits = _tma_logits_block(
        rows_desc, weight_desc, bias_ptr, row0, col0, cols, V, H, inv_temperature,
        HAS_BIAS, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    base._dlogits_epilogue(
        logits, offs_n, cols, offs_n < t_end, cols < v_end, t0, v0, targets_ptr, lse_ptr,
        grad_ptr, dlogits_ptr, block_max_ptr, stride_dn, inv_temperature, TRACK_MAX,
    )  # fmt: skip


def _configs_for_dtype(configs: list, named_args: dict, **kwargs: object) -> list:
    """:func:`.triton_tiles._configs_for_dtype` over this module's (hooked) config objects."""
    chosen = base._configs_for_dtype(base._CONFIGS, named_args, **kwargs)
    return [c for c, b in zip(_CONFIGS, base._CONFIGS) if any(b is x for x in chosen)]


# Autotuned like the pointer kernels, over this module's configs (descriptor block shapes set
# per config by their pre-hooks).
_forward_launcher = base.autotuned(_tma_forward_kernel, _CONFIGS, _configs_for_dtype)
_dlogits_launcher = base.autotuned(_tma_dlogits_kernel, _CONFIGS, _configs_for_dtype)


def _descriptor(tensor: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(tensor, block)


def _blocks() -> dict[str, int]:
    """Block sizes the descriptors start with (autotuning resets them per config)."""
    return (
        dict(base._INTERPRETER_CONFIG)
        if _INTERPRET
        else {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 64}
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(items: int, meta: dict, device: torch.device) -> int:
    """Persistent grid size: one program per SM for big tiles, two for small ones (capped by the
    work items); under the interpreter, three programs, so that each walks several items."""
    if _INTERPRET or device.type != "cuda":
        return min(items, 3)
    per_sm = 1 if meta["BLOCK_N"] * meta["BLOCK_V"] >= _BIG_TILE else 2
    return min(items, per_sm * _sm_count(device))


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
    base.check_dtype(rows)
    if not tma_compatible(rows, weight):
        launch_counts["tma_fallback"] += 1
        return base.forward(
            rows,
            weight,
            bias,
            targets,
            temperature=temperature,
            tiles=tiles,
            save_logits=save_logits,
        )
    n_rows, hidden = rows.shape
    vocab = weight.shape[0]
    edge = min(tiles.saved_columns, vocab) if save_logits else 0
    saved = torch.empty((n_rows, edge), dtype=torch.float32, device=rows.device) if edge else None
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.device)
        return empty, empty.clone(), saved
    shape_key = ("tma", hidden, vocab, rows.dtype, bias is not None, tiles.dot_precision)
    if not _INTERPRET and n_rows > base.TUNE_ROWS_CAP and shape_key not in base._tuned_on_prefix:
        cap = base.TUNE_ROWS_CAP
        forward(rows[:cap], weight, bias, targets[:cap], temperature=temperature, tiles=tiles)
        base._tuned_on_prefix.add(shape_key)
    cols_per_split, splits = base.split_columns(vocab, tiles.splits)
    partial = torch.empty((3, splits, n_rows), dtype=torch.float32, device=rows.device)
    blocks = _blocks()
    rows_desc = _descriptor(rows, [blocks["BLOCK_N"], blocks["BLOCK_K"]])
    weight_desc = _descriptor(weight, [blocks["BLOCK_V"], blocks["BLOCK_K"]])

    def grid(meta: dict) -> tuple[int]:
        items = triton.cdiv(n_rows, meta["BLOCK_N"]) * splits
        return (_programs(items, meta, rows.device),)

    with base.device_of(rows):
        _forward_launcher[grid](
            rows_desc,
            weight_desc,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            targets.contiguous(),
            partial,
            saved if saved is not None else partial,  # never written without SAVE_LOGITS
            n_rows,
            vocab,
            hidden,
            base.rows_bucket(n_rows),
            cols_per_split,
            splits,
            edge,
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            SAVE_LOGITS=saved is not None,
            DOT_PRECISION=tiles.dot_precision,
            DOT_IN_FP32=_INTERPRET and rows.dtype == torch.bfloat16,
            **(blocks if _INTERPRET else {}),
        )
    launch_counts["tma_forward"] += 1
    logp, lse = base.merge_splits(partial)
    return logp, lse, saved


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
    """:func:`.triton_tiles._fill_dlogits` with :func:`_tma_dlogits_kernel`."""
    n_tile, v_tile = dlogits.shape
    blocks = _blocks()
    rows_desc = _descriptor(rows, [blocks["BLOCK_N"], blocks["BLOCK_K"]])
    weight_desc = _descriptor(weight, [blocks["BLOCK_V"], blocks["BLOCK_K"]])

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_tile, meta["BLOCK_N"]), triton.cdiv(v_tile, meta["BLOCK_V"])

    with base.device_of(rows):
        _dlogits_launcher[grid](
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
            base.rows_bucket(n_tile),
            t0,
            t0 + n_tile,
            v0,
            v0 + v_tile,
            dlogits.stride(0),
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            TRACK_MAX=block_max is not None,
            DOT_PRECISION=dot_precision,
            DOT_IN_FP32=_INTERPRET and rows.dtype == torch.bfloat16,
            **(blocks if _INTERPRET else {}),
        )
    launch_counts["tma_dlogits"] += 1


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
    recompute = _fill_dlogits if tma_compatible(rows, weight) else None
    return base.backward(
        grad_logp, rows, weight, bias, targets, lse, temperature=temperature, tiles=tiles,
        needs_grad=needs_grad, saved=saved, recompute=recompute,
    )  # fmt: skip
