"""Which block sizes the Triton kernels try, which of them are known to spill, and how the tuner
keys and remembers its choice. Shared by :mod:`.triton_tiles` and :mod:`.triton_tma_tiles`.

On a GPU the kernels are autotuned (:func:`autotuned`) over short lists of matmul-shaped configs,
one per operand dtype (:data:`HALF_CONFIGS`, :data:`FP32_CONFIGS`), less those that spill registers
for the launch at hand (:func:`spills`). Which spill is data, not a rule of thumb: register use
moves with every flag (``ROUND_HEAD``, ``HAS_BIAS``, ``SAVE_LOGITS``, ``TRACK_MAX``,
``DOT_PRECISION``, ``EVEN_K``) and with the architecture, not monotonically (a bias can take
registers away), so ``benchmarks/compile_matrix.py --all-configs`` compiles every config of every
flag combination for sm_80, sm_90 and sm_100 and reads ptxas's report, and
:mod:`.triton_spills` is the table generated from it (with the Triton 3.6 base report). CI compiles
every flag value of every kernel again and fails when the compiler's answer moves
(tests/ops/test_compile.py).
The tuning key holds every argument that changes which config is fit or fastest: ``H`` (which
also decides ``EVEN_K``), ``V``, a bucket of the row count (:func:`rows_bucket`), the flags
``HAS_BIAS``/``ROUND_HEAD``/``SAVE_LOGITS``/``TRACK_MAX`` and ``DOT_PRECISION``, and the dtype of
every tensor argument (added by Triton for pointers; for the TMA kernels, whose descriptors carry
no dtype Triton reads, the ``ROWS_DTYPE`` argument). So a config pruned for one case (say,
spilling with saved logits) is never reused for another from the tuner's cache, and a prefix that
tunes for a huge call launches with the call's own flags (:func:`tune_on_prefix`). Under
``TRITON_INTERPRET=1`` there is no tuning: one fixed small config (:data:`INTERPRETER_CONFIG`).
``TRITON_INTERPRET`` must be set before this module (and Triton) is imported.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable

import torch
import triton

from . import triton_spills

__all__ = [
    "FP32_CONFIGS",
    "HALF_CONFIGS",
    "INTERPRET",
    "autotuned",
    "configs_for_call",
    "kept_configs",
    "rows_bucket",
    "spills",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Matmul-shaped configs (the kernels are GEMMs with a reduction epilogue). The compile report
# lists what was dropped and why: 128x256x64, and 128-row blocks with 4 warps, spill (on sm_80
# with both Triton versions, on sm_90 with 3.9); float32 operands spill or need 1 CTA/SM in
# 64-deep K-blocks. BLOCK_N=64 configs serve small N; 4-warp configs fit two or three CTAs per SM,
# 8-warp ones one.
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
CONFIGS = HALF_CONFIGS + FP32_CONFIGS
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}
# Block of the saved-logits dlogits kernel (elementwise, no tuning needed).
SAVED_BLOCK = {"BLOCK_N": 16, "BLOCK_V": 32} if INTERPRET else {"BLOCK_N": 64, "BLOCK_V": 128}
# The explicit blocks of every launch under the interpreter ({} on a GPU: the tuner picks).
LAUNCH_CONFIG = INTERPRETER_CONFIG if INTERPRET else {}

# Geometry constants of the GPU configs, and of this machine's (the interpreter has one config).
GPU_MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS)
# Vocabulary splits are whole multiples of every BLOCK_V, so no tile straddles two splits.
GPU_SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in CONFIGS)
MAX_BLOCK_N = INTERPRETER_CONFIG["BLOCK_N"] if INTERPRET else GPU_MAX_BLOCK_N
SPLIT_ALIGN = INTERPRETER_CONFIG["BLOCK_V"] if INTERPRET else GPU_SPLIT_ALIGN
# The smallest block edge of any launch: sizes the per-block max buffer of tile skipping.
MIN_BLOCK = min(
    *SAVED_BLOCK.values(),
    *(
        [min(INTERPRETER_CONFIG["BLOCK_N"], INTERPRETER_CONFIG["BLOCK_V"])]
        if INTERPRET
        else [min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in CONFIGS]
    ),
)

# Autotuning keys on a row-count bucket (powers of 4 from 64) capped here; a call with more rows
# tunes on its first TUNE_ROWS_CAP rows (see :func:`tune_on_prefix`).
TUNE_ROWS_CAP = 16384

# Tuning-key arguments besides H, V and ROWS, when the kernel has them: the flags change register
# pressure (and so the spill exclusions and the fastest config), the dot precision changes the
# instruction mix.
# ROWS_DTYPE: the TMA kernels take descriptors, which Triton's key does not read a dtype from.
_FLAG_KEYS = (
    "HAS_BIAS", "ROUND_HEAD", "SAVE_LOGITS", "TRACK_MAX", "DOT_PRECISION", "ROWS_DTYPE",
)  # fmt: skip


def config_name(config: triton.Config) -> str:
    """``"BLOCK_NxBLOCK_VxBLOCK_K wWARPS sSTAGES"``, e.g. ``"128x128x64 w8 s3"``."""
    k = config.kwargs
    return f"{k['BLOCK_N']}x{k['BLOCK_V']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def rows_bucket(n_rows: int) -> int:
    """The autotuning bucket of a row count: the power of 4 (from 64) at or above it, capped at
    :data:`TUNE_ROWS_CAP`. Configs tuned at one size serve every size of its bucket."""
    bucket = 64
    while bucket < min(n_rows, TUNE_ROWS_CAP):
        bucket *= 4
    return min(bucket, TUNE_ROWS_CAP)


# Which measured architecture stands for a compute capability's major version: the register file
# (64K 32-bit registers per SM, at most 255 per thread) is the same on all three, the code is not
# (mma.sync, wgmma, tcgen05).
_MEASURED_ARCH = {8: 80, 9: 90}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def spills(
    config: triton.Config,
    kernel: str,
    *,
    rows: str,
    round_head: bool,
    bias: bool,
    flag: bool,
    dot: str,
    hidden: int,
    major: int,
) -> bool:
    """Whether ``config`` spills registers for this launch, as ptxas reported it for every config
    of every flag combination (:data:`.triton_spills.SPILLING`, generated from the committed
    compile data; see ``benchmarks/compile_matrix.py``).

    Args:
        kernel: ``"forward"``, ``"dlogits"``, ``"tma_forward"`` or ``"tma_dlogits"``.
        rows: the rows' dtype, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp16 compiles like bf16:
            the data has bf16, and CI compiles fp16 against it).
        round_head: ``ROUND_HEAD`` (a float32 head with 16-bit rows); bias: ``HAS_BIAS``.
        flag: ``SAVE_LOGITS`` (forwards) or ``TRACK_MAX`` (the backward tile kernels).
        dot: ``DOT_PRECISION`` (``"tf32x3"`` or ``"tf32"``; ignored for 16-bit rows).
        hidden: ``H``, which with the config's ``BLOCK_K`` gives ``EVEN_K``.
        major: the GPU's compute capability major version (8: sm_80 data, 9: sm_90, 10 and
            above: sm_100).
    """
    family = "fp32" if rows == "fp32" else "bf16"
    head = "fp32" if round_head or family == "fp32" else "bf16"
    dot = dot if family == "fp32" else "tf32"
    even_k = hidden % config.kwargs["BLOCK_K"] == 0
    arch = _MEASURED_ARCH.get(major, 80 if major < 8 else 100)
    key = (kernel, family, head, dot, bias, flag, even_k, arch)
    return config_name(config) in triton_spills.SPILLING.get(key, ())


def kept_configs(kernel: str, **flags: object) -> tuple[list[triton.Config], bool]:
    """The configs of the operand dtype's list (:data:`FP32_CONFIGS` for float32 rows, else
    :data:`HALF_CONFIGS`) that do not spill for this launch (``flags``: those of :func:`spills`),
    and whether every config spills; then all of them are kept (a spill costs speed, not
    correctness: the tuner still picks the fastest)."""
    candidates = FP32_CONFIGS if flags["rows"] == "fp32" else HALF_CONFIGS
    free = [c for c in candidates if not spills(c, kernel, **flags)]
    return (free, False) if free else (list(candidates), True)


# Launches whose every config spills, already warned about (one warning per case and process).
_warned_all_spill: set[tuple] = set()


def configs_for_call(
    configs: list,
    named_args: dict,
    *,
    originals: list | None = None,
    kernel: str = "forward",
    **kwargs: object,
) -> list:
    """Autotuning candidates for one launch of ``kernel``: the operand dtype's list (float32
    operands, 3xTF32 or TF32 dots, need smaller K-blocks than 16-bit ones), less the configs that
    spill for it (:func:`kept_configs`). ``originals``: the configs of :data:`CONFIGS` that
    ``configs`` were made from, position by position (the TMA kernels' copies carry a pre-hook).
    When every config spills (float32 rows, 3xTF32, saved logits and an ``H`` no ``BLOCK_K``
    divides, on sm_100), all of them are tried, after one ``RuntimeWarning``."""
    rows = named_args.get("rows_ptr", named_args.get("rows_desc"))
    tensor = getattr(rows, "base", rows)  # a TMA descriptor holds its tensor as .base
    major = torch.cuda.get_device_capability(tensor.device)[0] if tensor.is_cuda else 9
    flags = dict(
        rows=_DTYPE_NAMES.get(tensor.dtype, "fp32"),
        round_head=bool(kwargs.get("ROUND_HEAD")),
        bias=bool(kwargs.get("HAS_BIAS")),
        flag=bool(kwargs.get("SAVE_LOGITS", kwargs.get("TRACK_MAX"))),
        dot=str(kwargs.get("DOT_PRECISION", "tf32")),
        hidden=int(named_args.get("H", 0)),
        major=major,
    )
    wanted, all_spill = kept_configs(kernel, **flags)
    if all_spill and (kernel, *flags.values()) not in _warned_all_spill:
        _warned_all_spill.add((kernel, *flags.values()))
        warnings.warn(
            f"solopo_kernels: every autotuning config of the {kernel} kernel spills registers for "
            f"{flags} (sm_{major}x, per the compile data); tuning among them (correct, slower). "
            "Saving no logits (KernelOptions(saved_logits_bytes=0)) or a hidden size that is a "
            "multiple of 64 avoids it.",
            RuntimeWarning,
            stacklevel=2,
        )
    return [c for c, o in zip(configs, originals or configs) if any(o is w for w in wanted)]


def autotuned(
    kernel: triton.JITFunction, configs: list, originals: list | None = None, *, name: str
) -> triton.JITFunction:
    """``kernel`` (``name``: ``"forward"``, ``"dlogits"``, ``"tma_forward"`` or
    ``"tma_dlogits"``) autotuned over ``configs`` (pruned per call by :func:`configs_for_call`),
    keyed on ``H``, ``V``, ``ROWS`` and the flags of ``_FLAG_KEYS`` it takes; the choice persists
    in Triton's on-disk cache where the installed Triton can (Triton skips the disk cache for
    configs with a pre-hook: the TMA kernels tune again in each new process). Under the
    interpreter, the kernel itself (launched with :data:`LAUNCH_CONFIG`)."""
    if INTERPRET:
        return kernel
    names = getattr(kernel, "arg_names", None) or getattr(kernel.fn, "arg_names", [])
    key = ["H", "V", "ROWS", *(k for k in _FLAG_KEYS if k in names)]
    extra = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = True

    def prune(candidates: list, named_args: dict, **kwargs: object) -> list:
        return configs_for_call(candidates, named_args, originals=originals, kernel=name, **kwargs)

    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **extra
    )(kernel)


# (backend, H, V, dtypes, weight strides, bias, dot precision, saved logits) of the shapes already
# tuned on a prefix. A cache, like the tuner's own: one entry per shape and process.
_tuned_on_prefix: set[tuple] = set()


def tune_on_prefix(n_rows: int, shape_key: tuple, run_prefix: Callable[[int], object]) -> None:
    """Before a call with more than :data:`TUNE_ROWS_CAP` rows (all in the capped bucket), run it
    once on its first ``TUNE_ROWS_CAP`` rows (``run_prefix(TUNE_ROWS_CAP)``), so that the tuner
    times its candidates at that size and not at the call's full size. ``run_prefix`` must launch
    with every tuning-key argument of the call (flags, dtypes) but the rows: only then is the key
    it tunes the one the call then finds in the tuner's cache."""
    if INTERPRET or n_rows <= TUNE_ROWS_CAP or shape_key in _tuned_on_prefix:
        return
    run_prefix(TUNE_ROWS_CAP)
    _tuned_on_prefix.add(shape_key)
