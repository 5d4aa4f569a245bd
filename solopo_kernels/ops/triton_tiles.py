"""Triton forward and backward of per-token log-probs (the CUDA path; CPU under the interpreter).

Same interface and semantics as :mod:`.torch_tiles`: ``logits = (rows @ weight.T + bias) /
temperature`` over gathered response rows ``(N, H)`` and the lm_head ``weight (V, H)``;
``logp = logits[target] - logsumexp(logits)``. docs/kernels.md explains the design and budgets.

Forward (one kernel, split-V, no logits in global memory)
    Program ``(row block, split)`` owns ``BLOCK_N`` rows and a contiguous range of the vocabulary
    (its *split*). It walks the split in ``BLOCK_V``-column tiles; each logits tile is a ``tl.dot``
    K-loop over ``H`` with float32 accumulation, bias and ``1 / temperature`` applied in registers,
    folded into a running max and a rescaled sum of exponentials (right for masked columns too:
    a split or a tail of ``-inf`` adds 0, not NaN; see :func:`.triton_kernels.fold_tile`), and
    the target logit is picked up when the target id falls in the tile. Only three float32 numbers
    per (split, row) are written, into a ``(3, splits, N)`` buffer; a few torch ops merge the
    splits (``O(splits * N)``, a fixed order: deterministic, no atomics, no locks). The number of
    splits comes from the SM count (:func:`vocab_splits`), so that small ``N`` still fills the
    GPU. With a saved-logits budget (:class:`.tiles.KernelOptions`: one per device, shared by the
    calls alive at once) the kernel also stores the float32 logits of the first ``saved_columns``
    columns.

Backward (a Triton tile kernel + cuBLAS GEMMs; exact by default)
    For a ``[token_tile, vocab_tile]`` tile, :func:`.triton_kernels.dlogits_kernel` recomputes the logits (same
    ``tl.dot`` K-loop, same input precision as the forward) and writes
    ``dlogits = g * (onehot - exp(logits - lse)) / temperature``, computed in float32 and stored in
    the input dtype, into one reused buffer; tiles inside the saved columns are read from the
    forward's logits instead (:func:`.triton_kernels.saved_dlogits_kernel`, no GEMM). Then
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

Opt-in gradient filtering (CCE-style), ``KernelOptions(skip_threshold=eps)``
    Skips the GEMMs of a ``[token_tile, vocab_tile]`` tile whose every ``|dlogits|`` is below
    ``eps`` (one host sync per tile). Values are unaffected; the gradient error is bounded by what
    is dropped: ``|d grad_rows[i, k]| <= eps * (skipped columns) * max|W|``,
    ``|d grad_weight[v, k]| <= eps * N * max|rows|``, ``|d grad_bias[v]| <= eps * N``. It pays
    only with tiles small enough to be uniformly negligible (set them with ``chunk_size``). Off by
    default; the torch backend computes every tile.

Dtypes and precision: float32, bfloat16 and float16 (float64: use the torch backend), and a
float32 weight (and bias) with bf16/fp16 rows (autocast with float32 master weights): each loaded
weight block is rounded to the rows' dtype in registers, so the logits are those of the rounded
head, no copy of the weight is made, and the weight gradient is float32. 16-bit operands go to
the tensor cores as they are (products exact in float32). float32 operands use the
3xTF32 split (``input_precision="tf32x3"``: each operand split into a TF32 high part and a TF32
remainder, three tensor-core products, relative error per product about ``2**-21``, against
``2**-24`` for IEEE float32 and ``2**-11`` for plain TF32); with
``torch.set_float32_matmul_precision("high")`` or ``"medium"``, plain TF32. The choice is made at
forward time and kept in :class:`.tiles.Tiles`, so that the backward recomputes the same logits.

Tolerances (what the tests check against the float64 reference computed from the same inputs,
as ``max |err| / max |ref|``): float32: values and gradients <= 1e-5; bfloat16/float16: values
<= 1e-5, gradients <= 1e-2 (the gradients are returned in the input dtype).

Block sizes: on CUDA ``triton.autotune`` over a short list of configs per operand dtype, less
those that spill registers for the launch's flags and GPU (a table of what ptxas reported for
every config of every flag combination), keyed on everything that changes a config's fitness
(:mod:`.triton_configs`). Under ``TRITON_INTERPRET=1``, one fixed small config.
``TRITON_INTERPRET`` must be set before this module (and Triton) is imported. The kernels
themselves are in :mod:`.triton_kernels`; this module sizes the grids and launches them.

FLOPs: forward ``2 N H V``; backward ``6 N H V`` (recomputed logits, ``grad_rows``, ``grad_weight``),
minus ``2 N H`` per saved column.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import replace

import torch
import triton

from . import triton_configs as configs
from . import triton_kernels as kernels
from .gradients import accumulate_gradients
from .tiles import KernelOptions, Tiles

__all__ = [
    "Tiles",
    "backward",
    "check_dtype",
    "default_tiles",
    "dot_precision",
    "forward",
    "launch_dlogits",
    "launch_forward",
    "launch_saved_dlogits",
    "run_forward",
    "split_columns",
    "tile_is_negligible",
    "vocab_splits",
]

# A split spans at least one of the widest tiles (a tile is a full K-loop over H, which dwarfs the
# per-split overhead: program start, three partial stores, the merge).
MIN_SPLIT_TILES = 1
# Target number of forward programs per SM: enough waves that the last one is not mostly idle.
PROGRAMS_PER_SM = 4
# Default size of the backward dlogits tile, in elements (128 MiB in bf16). Under the interpreter
# tiles are tiny anyway; tests pick multi-tile shapes through chunk_size.
_DLOGITS_ELEMENTS = 1 << 14 if configs.INTERPRET else 1 << 26
# The token tile never exceeds this: past it the GEMMs are already large, and a bigger vocab tile
# means fewer passes over rows.
_MAX_TOKEN_TILE = 8192

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FORWARD_LAUNCHER = configs.autotuned(
    kernels.even_k(kernels.forward_kernel), configs.CONFIGS, name="forward"
)
DLOGITS_LAUNCHER = configs.autotuned(
    kernels.even_k(kernels.dlogits_kernel), configs.CONFIGS, name="dlogits"
)


# ---------------------------------------------------------------------------------------------
# Geometry: pure functions of the sizes (and the SM count), tested without a GPU.


def vocab_splits(
    n_rows: int,
    vocab: int,
    sm_count: int,
    *,
    max_block_n: int = configs.MAX_BLOCK_N,
    split_align: int = configs.SPLIT_ALIGN,
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


def split_columns(
    vocab: int, splits: int, *, split_align: int = configs.SPLIT_ALIGN
) -> tuple[int, int]:
    """``(columns per split, splits)``: splits of whole ``split_align`` multiples, the last one
    ragged, none empty (rounding up can leave fewer splits than asked)."""
    columns = triton.cdiv(triton.cdiv(vocab, max(1, splits)), split_align) * split_align
    return columns, triton.cdiv(vocab, columns)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _device_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """:func:`vocab_splits` for ``device``; 1 under the interpreter (tests ask for more)."""
    if configs.INTERPRET or device.type != "cuda":
        return 1
    return vocab_splits(n_rows, vocab, sm_count(device))


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
    """Tiles for ``n_rows`` gathered rows of ``dtype`` against a ``(vocab, hidden)`` weight.

    The forward keeps no tile in memory, so ``chunk_size`` shapes only the backward ``dlogits``
    tile: an int sets its token rows, a pair ``(tokens, vocab columns)`` sets both. By default the
    token tile holds every row up to ``_MAX_TOKEN_TILE`` and the vocab tile fills the rest of the
    ``_DLOGITS_ELEMENTS`` budget (a multiple of the block width, at least one block). ``options``
    sets the saved columns and the skip threshold; the dot precision is fixed here.
    """
    options = options or KernelOptions()
    align = configs.SPLIT_ALIGN
    if isinstance(chunk_size, tuple):
        token_tile, vocab_tile = chunk_size
    else:
        token_tile = chunk_size if chunk_size is not None else min(max(1, n_rows), _MAX_TOKEN_TILE)
        vocab_tile = max(align, _DLOGITS_ELEMENTS // token_tile // align * align)
    return Tiles(
        token_tile=max(1, min(token_tile, n_rows)),
        vocab_tile=min(vocab_tile, vocab),
        saved_columns=options.saved_logits_budget.columns(n_rows, vocab, in_use=0),
        splits=_device_splits(n_rows, vocab, device),
        skip_threshold=options.skip_threshold,
        dot_precision=dot_precision(dtype),
    )


# ---------------------------------------------------------------------------------------------
# Launch helpers shared by both Triton backends.


def check_dtype(rows: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    if rows.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f'backend="triton": expected float32, bfloat16 or float16 hidden states and weight, '
            f'got {rows.dtype}; use backend="torch" for float64 (e.g. torch.autograd.gradcheck)'
        )
    if weight is not None and weight.dtype not in (rows.dtype, torch.float32):
        raise TypeError(
            f"weight: expected {rows.dtype} (the rows' dtype) or float32, got {weight.dtype}"
        )


def round_head(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """A float32 head meeting 16-bit rows is rounded to the rows' dtype inside the kernels."""
    return weight.dtype != rows.dtype


def dot_in_fp32(rows: torch.Tensor) -> bool:
    """Interpreter only: bf16 dots are fed up-cast (see :func:`.triton_kernels.logits_block`)."""
    return configs.INTERPRET and rows.dtype == torch.bfloat16


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


# launch(rows, weight, bias, targets, partial, saved, cols_per_split, splits, saved_cols,
#        temperature, tiles): fill the (3, splits, N) partials (and the saved logits).
ForwardLaunch = Callable[..., None]


def run_forward(
    launch: ForwardLaunch,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    tiles: Tiles,
    save_logits: bool,
    tuning_key: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward around one kernel launch, shared by both Triton backends: checks, the saved
    logits and partials buffers, tuning on a prefix for huge calls, the merge of the splits.

    The prefix runs with the call's own flags (saved logits included: ``SAVE_LOGITS`` is part of
    the tuning key, so a prefix without them would tune a key the call never uses, and the call
    would be tuned again at full size). Its saved logits (``TUNE_ROWS_CAP`` rows) are freed
    before the call's own are allocated, so the peak stays within the call's share of the
    budget."""
    check_dtype(rows, weight)
    n_rows = rows.shape[0]
    vocab = weight.shape[0]
    edge = min(tiles.saved_columns, vocab) if save_logits else 0
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.device)
        saved = torch.empty((0, edge), dtype=torch.float32, device=rows.device) if edge else None
        return empty, empty.clone(), saved
    shape_key = (*tuning_key, rows.dtype, weight.dtype, weight.stride(), bias is not None)

    def run_prefix(cap: int) -> object:
        return run_forward(
            launch, rows[:cap], weight, bias, targets[:cap], temperature=temperature,
            tiles=tiles, save_logits=save_logits, tuning_key=tuning_key,
        )  # fmt: skip

    configs.tune_on_prefix(n_rows, (*shape_key, tiles.dot_precision, edge > 0), run_prefix)
    saved = torch.empty((n_rows, edge), dtype=torch.float32, device=rows.device) if edge else None
    cols_per_split, splits = split_columns(vocab, tiles.splits)
    partial = torch.empty((3, splits, n_rows), dtype=torch.float32, device=rows.device)
    with device_of(rows):
        launch(
            rows, weight, bias, targets.contiguous(), partial, saved, cols_per_split, splits,
            edge, temperature, tiles,
        )  # fmt: skip
    logp, lse = merge_splits(partial)
    return logp, lse, saved


def launch_forward(
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
    """Launch :func:`.triton_kernels.forward_kernel` over ``(row blocks, splits)``."""
    n_rows, hidden = rows.shape

    def grid(meta: dict) -> tuple[int, int]:  # BLOCK_N comes from the (autotuned) config
        return triton.cdiv(n_rows, meta["BLOCK_N"]), splits

    FORWARD_LAUNCHER[grid](
        rows,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        targets,
        partial,
        saved if saved is not None else partial,  # never written without SAVE_LOGITS
        n_rows,
        weight.shape[0],
        hidden,
        configs.rows_bucket(n_rows),
        cols_per_split,
        saved_cols,
        rows.stride(0),
        rows.stride(1),
        weight.stride(0),
        weight.stride(1),
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        ROUND_HEAD=round_head(rows, weight),
        SAVE_LOGITS=saved is not None,
        DOT_PRECISION=tiles.dot_precision,
        DOT_IN_FP32=dot_in_fp32(rows),
        **configs.LAUNCH_CONFIG,
    )


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
        weight: ``(V, H)`` lm_head weight, the dtype of ``rows`` or float32 (any strides).
        bias: ``(V,)`` contiguous float tensor or None.
        targets: ``(N,)`` integer target ids in ``[0, V)`` (others match no column).
        tiles: from :func:`default_tiles`; ``tiles.splits`` vocabulary splits.
        save_logits: keep the float32 logits of columns ``[0, tiles.saved_columns)``.
    Returns:
        ``(logp, lse, saved)``: ``(N,)`` float32 log-probs and log-sum-exps, and the
        ``(N, saved_columns)`` float32 saved logits (None if none).
    """
    return run_forward(
        launch_forward, rows, weight, bias, targets, temperature=temperature, tiles=tiles,
        save_logits=save_logits, tuning_key=("pointer", rows.shape[1], weight.shape[0]),
    )  # fmt: skip


def tile_is_negligible(block_max: torch.Tensor, threshold: float) -> bool:
    """Whether a tile's largest ``|dlogits|`` (the max of its per-block maxima) is below the
    opt-in skip threshold (one host sync)."""
    return block_max.max().item() < threshold


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

    :func:`launch_dlogits` (or, inside the columns of ``saved``, :func:`launch_saved_dlogits`)
    fills one reused ``dlogits`` buffer (the rows' dtype) per tile; the shared tile loop of
    :mod:`.gradients` adds it into float32 accumulators with two GEMMs. Returns gradients in the
    dtypes of ``rows``, ``weight`` and ``bias`` (None where not needed). ``recompute`` replaces
    :func:`launch_dlogits` (another Triton variant's tile kernel, same arguments).
    """
    check_dtype(rows, weight)
    n_rows = rows.shape[0]
    token_tile = max(1, min(tiles.token_tile, n_rows))
    vocab_tile = max(1, min(tiles.vocab_tile, weight.shape[0]))
    edge = saved.shape[1] if saved is not None else 0
    buffer = torch.empty(token_tile * vocab_tile, dtype=rows.dtype, device=rows.device)
    block_max = None
    if tiles.skip_threshold > 0:
        block_max = torch.empty(
            triton.cdiv(token_tile, configs.MIN_BLOCK) * triton.cdiv(vocab_tile, configs.MIN_BLOCK),
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
            launch_saved_dlogits(dlogits, saved, grad_logp, targets, lse, t0, v0, **common)
        else:
            (recompute or launch_dlogits)(
                dlogits, grad_logp, rows, weight, bias, targets, lse, t0, v0,
                dot_precision=tiles.dot_precision, **common,
            )  # fmt: skip
        if block_max is not None and tile_is_negligible(block_max, tiles.skip_threshold):
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


def launch_dlogits(
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
    """Launch :func:`.triton_kernels.dlogits_kernel` for the tile starting at ``(t0, v0)`` of
    the shape of ``dlogits`` (any row stride)."""
    n_tile, v_tile = dlogits.shape
    n_rows, hidden = rows.shape

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_tile, meta["BLOCK_N"]), triton.cdiv(v_tile, meta["BLOCK_V"])

    with device_of(rows):
        DLOGITS_LAUNCHER[grid](
            rows,
            weight,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            targets,
            lse,
            grad_logp,
            dlogits,
            block_max if block_max is not None else lse,  # never written without TRACK_MAX
            n_rows,
            weight.shape[0],
            hidden,
            configs.rows_bucket(n_tile),
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
            ROUND_HEAD=round_head(rows, weight),
            TRACK_MAX=block_max is not None,
            DOT_PRECISION=dot_precision,
            DOT_IN_FP32=dot_in_fp32(rows),
            **configs.LAUNCH_CONFIG,
        )


def launch_saved_dlogits(
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
    """Launch :func:`.triton_kernels.saved_dlogits_kernel` for the tile starting at ``(t0, v0)``
    of the shape of ``dlogits``, reading the forward's logits from ``saved``."""
    n_tile, v_tile = dlogits.shape
    block = configs.SAVED_BLOCK
    grid = (triton.cdiv(n_tile, block["BLOCK_N"]), triton.cdiv(v_tile, block["BLOCK_V"]))
    with device_of(saved):
        kernels.saved_dlogits_kernel[grid](
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
            **block,
        )
