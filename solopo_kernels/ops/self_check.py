"""First-use self-check of the Triton backends on CUDA, with a loud fallback to the torch backend.

Why: the Triton kernels are compiled for the GPU, the Triton version and the torch build a user
has, none of which our CI can run. A wrong kernel on some GPU would silently train on wrong
gradients. So the first call per ``(backend, device, hidden dtype, weight dtype)`` on CUDA runs
one small random case through the Triton backend and through the torch backend and compares them:
``N = 160`` rows in two token tiles, ``V = 700`` columns in two vocabulary tiles (ragged), ``H =
192``, bias and temperature on, forward and the gradients of rows, weight and bias, once with
every tile recomputed and once with the forward's logits saved for part of the vocabulary. The
backward's float32-accumulating GEMM route (:mod:`.gemm_routes`) is probed on the way.

* With ``backend="auto"``, a difference beyond the tolerance, or an exception, warns once (what
  differed, by how much, the tolerance, and the doctor command to report it) and that key uses the
  torch backend from then on.
* With ``backend="triton"`` (or ``"triton_tma"``) asked for explicitly, the same failure raises a
  ``RuntimeError`` instead: nothing falls back behind an explicit choice.
* ``SOLOPO_KERNELS_SELF_CHECK=0`` in the environment turns the check off.

Cost: compiling (and, on a GPU, autotuning) the kernels at the check's shape, a few seconds once
per key and process, and a few milliseconds of GPU time; nothing is kept in memory afterwards.

Tolerances (``max |triton - torch| / max |torch|``): log-probs 1e-4; gradients 1e-4 for float32
rows with 3xTF32 dots, 2e-2 for 16-bit rows or plain TF32 dots. The documented errors against a
float64 reference are half of these (1e-5 and 1e-2), so two correct backends always agree within
them, and a kernel that is wrong on some GPU (a bad address, a dropped tile, a bit-pattern dot)
differs by far more.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from .tiles import KernelOptions

__all__ = ["ENV_VAR", "SelfCheckError", "compare_backends", "triton_passes"]

ENV_VAR = "SOLOPO_KERNELS_SELF_CHECK"
DOCTOR = "python -m solopo_kernels.doctor"
VALUE_TOL = 1e-4
GRAD_TOL_EXACT = 1e-4  # float32 rows, 3xTF32 dots
GRAD_TOL_ROUNDED = 2e-2  # 16-bit rows, or TF32 dots

# The check's case: two token tiles and two (ragged) vocabulary tiles.
N_ROWS, HIDDEN, VOCAB = 160, 192, 700
CHUNK = (96, 384)
TEMPERATURE = 0.7

# (backend, device, rows dtype, weight dtype) -> None (passed) or the failure's description.
_results: dict[tuple[str, str, torch.dtype, torch.dtype], str | None] = {}


class SelfCheckError(RuntimeError):
    """The Triton backend disagreed with the torch backend (or raised) in the self-check."""


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def checks_device(device: torch.device) -> bool:
    """Whether calls on ``device`` are self-checked: CUDA devices (compiled kernels)."""
    return device.type == "cuda"


def _case(device: torch.device, rows_dtype: torch.dtype, weight_dtype: torch.dtype) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(1234)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    # Logits with a trained head's spread (std ~ 3), targets anywhere, the last id included.
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=generator).to(device)
    targets[-1] = VOCAB - 1
    return {
        "rows": randn(N_ROWS, HIDDEN).to(rows_dtype),
        "weight": randn(VOCAB, HIDDEN, scale=3 / HIDDEN**0.5).to(weight_dtype),
        "bias": randn(VOCAB).to(weight_dtype),
        "targets": targets,
        "grad": randn(N_ROWS),
    }


def _run(module: ModuleType, case: dict, options: KernelOptions) -> dict[str, torch.Tensor]:
    rows, weight, bias, targets = case["rows"], case["weight"], case["bias"], case["targets"]
    tiles = module.default_tiles(
        N_ROWS, HIDDEN, VOCAB, rows.device, CHUNK, options, rows.dtype
    )
    logp, lse, saved = module.forward(
        rows, weight, bias, targets, temperature=TEMPERATURE, tiles=tiles, save_logits=True
    )
    grad_rows, grad_weight, grad_bias = module.backward(
        case["grad"], rows, weight, bias, targets, lse, temperature=TEMPERATURE, tiles=tiles,
        needs_grad=(True, True, True), saved=saved,
    )  # fmt: skip
    return {"logp": logp, "grad_rows": grad_rows, "grad_weight": grad_weight, "grad_bias": grad_bias}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected, actual = expected.double(), actual.double()
    scale = expected.abs().max().item() or 1.0
    error = (actual - expected).abs().max().item() / scale
    return float("inf") if error != error else error  # NaN is a failure, never a pass


def compare_backends(
    module: ModuleType, device: torch.device, rows_dtype: torch.dtype, weight_dtype: torch.dtype
) -> str | None:
    """Run the check's case through ``module`` and the torch backend; None if they agree within
    the tolerances, else what differed (or what was raised)."""
    try:  # no autograd, and no autocast: the first call may come from a forward under it
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return _compare(module, device, rows_dtype, weight_dtype)
    except Exception as exc:  # e.g. out of memory in the torch reference: a verdict all the same
        return f"the check itself raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _compare(
    module: ModuleType, device: torch.device, rows_dtype: torch.dtype, weight_dtype: torch.dtype
) -> str | None:
    from . import torch_tiles, triton_tiles

    case = _case(device, rows_dtype, weight_dtype)
    exact = rows_dtype == torch.float32 and triton_tiles.dot_precision(rows_dtype) == "tf32x3"
    grad_tol = GRAD_TOL_EXACT if exact else GRAD_TOL_ROUNDED
    recompute_all = KernelOptions(saved_logits_bytes=0)
    expected = _run(torch_tiles, case, recompute_all)
    failures = []
    # Every tile recomputed, then the logits of the first 256 columns saved by the forward.
    for label, options in (
        ("recomputed", recompute_all),
        ("saved logits", KernelOptions(saved_logits_bytes=4 * N_ROWS * 256)),
    ):
        try:
            actual = _run(module, case, options)
        except Exception as exc:  # any failure of the kernels is the finding
            return f"{label}: raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        for name, value in actual.items():
            tol = VALUE_TOL if name == "logp" else grad_tol
            error = _relative(value, expected[name])
            if not error <= tol:
                failures.append(f"{label}: {name} differs by {error:.3g} (tolerance {tol:g})")
    return "; ".join(failures) or None


def triton_passes(
    module: ModuleType,
    backend: str,
    device: torch.device,
    rows_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    *,
    explicit: bool,
) -> bool:
    """Whether the Triton ``module`` may serve this call: the self-check's verdict for the key,
    run on first use. ``explicit`` (the user named the backend): a failure raises
    :class:`SelfCheckError`; otherwise it warns once and returns False from then on."""
    if not (enabled() and checks_device(device)):
        return True
    key = (backend, str(device), rows_dtype, weight_dtype)
    if key not in _results:
        _results[key] = compare_backends(module, device, rows_dtype, weight_dtype)
        failure = _results[key]
        if failure is not None and not explicit:
            warnings.warn(
                f"solopo_kernels: the {backend} backend failed its first-use self-check on "
                f"{device} ({_describe(device)}) for {rows_dtype} hidden states with a "
                f"{weight_dtype} head: {failure}. Using the torch backend for these calls (correct, "
                f"slower). Please report the output of `{DOCTOR}`; {ENV_VAR}=0 skips the check.",
                RuntimeWarning,
                stacklevel=4,
            )
    failure = _results[key]
    if failure is not None and explicit:
        raise SelfCheckError(
            f'backend="{backend}" failed its self-check on {device} ({_describe(device)}) for '
            f"{rows_dtype} hidden states with a {weight_dtype} head: {failure}. Use "
            f'backend="torch" (or "auto", which falls back by itself) and please report the '
            f"output of `{DOCTOR}`; {ENV_VAR}=0 skips the check."
        )
    return failure is None


def _describe(device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}, torch {torch.__version__}, triton {triton.__version__}"
