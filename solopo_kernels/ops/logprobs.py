"""``fused_linear_logprobs``: per-token log-probs of the labels, straight from hidden states.

This module is the one dispatch point of the package: it checks inputs, gathers the response
rows (labels != ignore_index) so that work and memory scale with the number of response tokens
``N`` and not with all positions ``T``, picks a backend, and wraps the backend's forward/backward
in one ``torch.autograd.Function``. A backend is a module with

* ``default_tiles(N, H, V, device, chunk_size, options, dtype) -> tiles`` (a
  :class:`.tiles.Tiles`),
* ``forward(rows, weight, bias, targets, *, temperature, tiles, save_logits) -> (logp, lse,
  saved)`` and
* ``backward(grad_logp, rows, weight, bias, targets, lse, *, temperature, tiles, needs_grad,
  saved) -> (grad_rows, grad_weight, grad_bias)``, which may overwrite ``saved``,

operating on gathered rows ``(N, H)``. No backend holds an ``N x V`` tensor unless the caller
keeps saved logits, and then within the byte budget of :class:`.tiles.KernelOptions` (256 MiB
by default; 0 for none), which bounds the saved logits of all calls alive on a device together:
this module takes each call's share from :data:`.saved_logits.LEDGER` before its forward and
ties it to the saved tensor, which gives it back when freed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch

from ..checks import (
    check_choice,
    check_float,
    check_integer,
    check_labels_and_lengths,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from . import self_check
from .saved_logits import LEDGER, Reservation
from .tiles import KernelOptions, check_kernel_options

# "triton_tma": the persistent TMA variant of the Triton backend (opt-in; see triton_tma_tiles).
BACKENDS = ("auto", "torch", "triton", "triton_tma")
ChunkSize = int | tuple[int, int] | None


def triton_available() -> bool:
    """Whether ``triton`` imports (the Triton backend then runs on CUDA, or anywhere under
    ``TRITON_INTERPRET=1``)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def auto_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What ``backend="auto"`` names on ``device`` for inputs of ``dtype``: ``"triton"`` on CUDA
    devices when Triton is installed, ``"torch"`` otherwise (and always for float64, which only
    the torch backend computes, e.g. for gradcheck). The interpreter (``TRITON_INTERPRET=1``) is
    never chosen automatically: ask for ``"triton"``."""
    use_triton = device.type == "cuda" and dtype != torch.float64 and triton_available()
    return "triton" if use_triton else "torch"


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype | None = None
) -> ModuleType:
    """The backend module for ``backend`` on ``device`` for inputs of ``dtype`` (``"auto"``:
    :func:`auto_backend`). ``"triton_tma"`` (opt-in) is the persistent TMA variant of the Triton
    backend. Raises ``ValueError`` naming the fix when the backend cannot run here."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = auto_backend(device, dtype)
    if backend.startswith("triton"):
        if not triton_available():
            raise ValueError(
                f'backend="{backend}" needs the triton package: pip install "solopo-kernels[triton]"'
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f'backend="{backend}" runs on CUDA tensors (got {device}); on the CPU set '
                'TRITON_INTERPRET=1 (slow, for tests) or use backend="torch"'
            )
    return importlib.import_module(f"{__package__}.{backend}_tiles")


def checked_backend(backend: str, rows: torch.Tensor, weight: torch.Tensor) -> ModuleType:
    """:func:`resolve_backend`, then, for a Triton backend on CUDA, its first-use self-check
    (:mod:`.self_check`): with ``"auto"`` a failed check means the torch backend (after one
    warning); a Triton backend asked for by name raises instead."""
    module = resolve_backend(backend, rows.device, rows.dtype)
    name = auto_backend(rows.device, rows.dtype) if backend == "auto" else backend
    if name.startswith("triton") and not self_check.triton_passes(
        module, name, rows.device, rows.dtype, weight.dtype, explicit=backend != "auto"
    ):
        return resolve_backend("torch", rows.device, rows.dtype)
    return module


def check_chunk_size(chunk_size: ChunkSize) -> None:
    def positive_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if chunk_size is None or positive_int(chunk_size):
        return
    if (
        isinstance(chunk_size, tuple)
        and len(chunk_size) == 2
        and all(map(positive_int, chunk_size))
    ):
        return
    raise ValueError(
        "chunk_size: expected None, a positive int (tokens per tile) or a pair of positive ints "
        f"(tokens per tile, vocabulary columns per tile), got {chunk_size!r}"
    )


def check_head(weight: object, bias: object, hidden_size: int | None = None) -> tuple[int, int]:
    """Check ``weight (V, H)`` and ``bias (V,)``; return ``(V, H)``."""
    weight = check_tensor("weight", weight)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            f"weight: expected the lm_head weight of shape (V, H), got {tuple(weight.shape)}"
        )
    vocab, hidden = weight.shape
    if hidden_size is not None and hidden != hidden_size:
        raise ValueError(
            f"weight: expected shape (V, H) with H = {hidden_size} (the hidden size of the hidden "
            f"states), got {tuple(weight.shape)}"
        )
    if bias is not None:
        bias = check_tensor("bias", bias)
        check_float("bias", bias)
        check_shape("bias", bias, (vocab,), "(V,)")
        check_same_device("weight", weight, bias=bias)
    return vocab, hidden


def head_dtypes_match(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether hidden states of ``hidden_dtype`` can meet a head of ``weight_dtype``: the same
    dtype, or 16-bit hidden states with a float32 weight (autocast with float32 master weights;
    the head is then rounded to the hidden dtype tile by tile, never copied whole)."""
    return hidden_dtype == weight_dtype or (
        weight_dtype == torch.float32 and hidden_dtype in (torch.bfloat16, torch.float16)
    )


def check_hidden_and_labels(
    hidden_name: str, hidden: object, labels_name: str, labels: object, weight: torch.Tensor
) -> None:
    """Shape/dtype/device checks of one ``hidden (..., H)`` and its ``labels (...)``."""
    hidden = check_tensor(hidden_name, hidden)
    labels = check_tensor(labels_name, labels)
    check_float(hidden_name, hidden)
    check_integer(labels_name, labels)
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name}: expected shape (..., H), got a scalar")
    if not head_dtypes_match(hidden.dtype, weight.dtype):
        raise TypeError(
            f"{hidden_name}: expected the dtype of weight ({weight.dtype}), or bfloat16/float16 "
            f"with a float32 weight, got {hidden.dtype}; cast one of them (the kernels accumulate "
            "in float32 either way)"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name}: expected shape (..., H) with H = {weight.shape[1]} (weight is "
            f"{tuple(weight.shape)}), got {tuple(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{labels_name}: expected shape {tuple(hidden.shape[:-1])} (the leading shape of "
            f"{hidden_name}, already shifted), got {tuple(labels.shape)}"
        )
    check_same_device("weight", weight, **{hidden_name: hidden, labels_name: labels})


def response_positions(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, ...]:
    """Indices (one tensor per dimension of ``labels``) of the positions whose label is not
    ``ignore_index``. Computing them is the gather's one host sync (the count of response tokens
    sizes the rows); indexing with them afterwards is sync-free and copies only those rows, even
    from a non-contiguous ``hidden``."""
    return torch.nonzero(labels != ignore_index, as_tuple=True)


def scatter_to_positions(
    values: torch.Tensor, positions: tuple[torch.Tensor, ...], shape: torch.Size
) -> torch.Tensor:
    """``values`` placed at ``positions`` in zeros of ``shape`` (differentiable in ``values``)."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_put(positions, values)


# A row whose log-sum-exp is below this has no logit a float32 head can resolve: every column is
# a mask value (float32 logits of magnitude 2**24 and more are at least 1 nat apart).
MASKED_ROW_LSE = -(2.0**24)


def check_rows_have_a_distribution(lse: torch.Tensor) -> None:
    """Value check (one host sync, skipped with the others, see :mod:`..checks`): every row's
    ``lse (N,)`` is finite and above :data:`MASKED_ROW_LSE`. A row whose every logit is masked
    (``-inf``, or a finite mask such as ``-1e30``) has no distribution to take a log-prob from:
    it would give NaN (``-inf``) or a meaningless number (finite masks) with no error."""
    if not value_checks_enabled() or lse.numel() == 0:
        return
    bad = ~(lse > MASKED_ROW_LSE) | (lse == torch.inf)  # NaN compares False: bad
    count = int(bad.sum())
    if count:
        rows = bad.nonzero().flatten()[:5].tolist()
        largest = [f"{v:.3g}" for v in lse[rows].tolist()]
        raise ValueError(
            f"logits: {count} response position(s) (e.g. positions {rows} in order, log-sum-exp "
            f"{largest}) have no logit above {MASKED_ROW_LSE:.3g}: every vocabulary column of the "
            "row is masked (bias -inf or a large negative value) or a logit is +inf/NaN, so there "
            "is no distribution to take a log-prob from; leave at least one token unmasked"
        )


class LinearLogProbs(torch.autograd.Function):
    """Autograd wrapper of a backend on gathered rows. Saves the rows (its input), the weight,
    the bias, the targets, one log-sum-exp per row and the saved logits, if the tiles ask for any
    (``reservation``: their bytes, taken from the saved-logits ledger, given back when the saved
    tensor is freed); the backward recomputes the other logits from the weight. (Under DeepSpeed
    ZeRO-3 the weight is whole in both: read inside the wrapped model's forward, DeepSpeed gathers
    it then and again before the backward; see solopo_kernels/integrations/model_patch.py.)"""

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        tiles: Any,
        backend: ModuleType,
        reservation: Reservation,
    ) -> torch.Tensor:
        try:
            logp, lse, saved = backend.forward(
                rows, weight, bias, targets, temperature=temperature, tiles=tiles, save_logits=True
            )
            reservation.hold(saved)
        except BaseException:
            reservation.release()
            raise
        check_rows_have_a_distribution(lse)
        ctx.save_for_backward(rows, weight, bias, targets, lse)
        # Not through save_for_backward: a backward may consume (overwrite) the saved logits, and
        # drops them, so that a second backward (retain_graph=True) recomputes every tile.
        ctx.saved_logits = saved
        ctx.temperature, ctx.tiles, ctx.backend = temperature, tiles, backend
        return logp

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor) -> tuple[Any, ...]:
        rows, weight, bias, targets, lse = ctx.saved_tensors
        saved, ctx.saved_logits = ctx.saved_logits, None
        grad_rows, grad_weight, grad_bias = ctx.backend.backward(
            grad_logp.contiguous(),
            rows,
            weight,
            bias,
            targets,
            lse,
            temperature=ctx.temperature,
            tiles=ctx.tiles,
            needs_grad=tuple(ctx.needs_input_grad[:3]),
            saved=saved,
        )
        return grad_rows, grad_weight, grad_bias, None, None, None, None, None


def response_logprobs(
    rows: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: ChunkSize = None,
    backend: str = "auto",
    kernel_options: KernelOptions | None = None,
) -> torch.Tensor:
    """Log-probs of ``targets`` for already gathered rows; no input checks (callers check).

    Args:
        rows: ``(N, H)`` response hidden states, the dtype of ``weight`` (or 16-bit with a
            float32 ``weight``).
        weight: ``(V, H)``; bias: ``(V,)`` or None.
        targets: ``(N,)`` integer ids in ``[0, V)``.
        kernel_options: kernel knobs (:class:`.tiles.KernelOptions`), or None for the defaults.
    Returns:
        ``(N,)`` float32 log-probs (float64 for float64 inputs), differentiable in ``rows``,
        ``weight`` and ``bias``. Under ``torch.no_grad()`` (or when nothing requires grad) the
        forward runs alone and nothing is saved; otherwise the forward saves the logits that the
        saved-logits budget has left on this device (:mod:`.saved_logits`).
    """
    module = checked_backend(backend, rows, weight)
    rows = rows.contiguous()
    # The kernels read the bias as contiguous (V elements: the copy, if any, is cheap).
    bias = bias.contiguous() if bias is not None else None
    n_rows, hidden = rows.shape
    tiles = module.default_tiles(
        n_rows, hidden, weight.shape[0], rows.device, chunk_size, kernel_options, rows.dtype
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rows, weight, bias)
    )
    if not needs_grad:
        logp, lse, _ = module.forward(
            rows, weight, bias, targets, temperature=temperature, tiles=tiles
        )
        check_rows_have_a_distribution(lse)
        return logp
    options = kernel_options or KernelOptions()
    reservation = LEDGER.reserve(
        options.saved_logits_budget, rows.device, n_rows, weight.shape[0], tiles.saved_columns
    )
    tiles = replace(tiles, saved_columns=reservation.columns)
    return LinearLogProbs.apply(
        rows, weight, bias, targets, temperature, tiles, module, reservation
    )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: ChunkSize = None,
    backend: str = "auto",
    kernel_options: KernelOptions | None = None,
) -> torch.Tensor:
    """Per-token log-probs ``log softmax((hidden @ weight.T + bias) / temperature)[labels]``,
    computed only at response positions and never materialising ``[tokens x vocab]`` logits.

    Args:
        hidden: ``(..., H)`` last hidden states (the lm_head input); float32, bfloat16, float16
            (or float64, for gradcheck). Same dtype as ``weight``, or 16-bit with a float32
            ``weight``.
        weight: ``(V, H)`` lm_head weight. A float32 weight (and bias) with bf16/fp16 ``hidden``
            is rounded to ``hidden``'s dtype tile by tile inside the kernels, as autocast would
            round it, without a full-size copy; its gradient is float32.
        labels: ``(...)`` integer token ids, already shifted (``hidden[..., t, :]`` predicts
            ``labels[..., t]``); ``ignore_index`` marks prompt and padding positions.
        bias: ``(V,)`` lm_head bias, or None.
        ignore_index: label value of positions that are not response tokens.
        temperature: the logits are divided by it before the softmax (> 0).
        chunk_size: tile override: an int (tokens per tile) or ``(tokens, vocab columns)``;
            default: derived from H, V and the device.
        backend: ``"auto"`` (Triton on CUDA when installed, else torch), ``"torch"``, ``"triton"``
            or ``"triton_tma"`` (the persistent TMA variant, Hopper and newer; opt-in).
        kernel_options: kernel knobs (:class:`solopo_kernels.ops.KernelOptions`; None: the
            defaults, which keep up to 256 MiB of float32 forward logits to skip their recompute;
            ``KernelOptions(saved_logits_bytes=0)`` for the strict minimal-memory kernels).
    Returns:
        float32 tensor of the shape of ``labels`` (float64 for float64 inputs), 0.0 at ignored
        positions; differentiable in ``hidden``, ``weight`` and ``bias``.
    Raises:
        TypeError / ValueError naming the argument on bad input (the cases are listed in docs/api.md).
    """
    vocab, _ = check_head(weight, bias)
    check_hidden_and_labels("hidden", hidden, "labels", labels, weight)
    check_positive("temperature", temperature)
    check_chunk_size(chunk_size)
    kernel_options = check_kernel_options(kernel_options)
    check_labels_and_lengths([("labels", labels)], vocab, ignore_index, require_response=False)
    resolve_backend(backend, hidden.device, hidden.dtype)

    if labels.dim() == 0:  # one position: hidden (H,), a scalar label
        return fused_linear_logprobs(
            hidden.unsqueeze(0), weight, labels.unsqueeze(0), bias, ignore_index=ignore_index,
            temperature=temperature, chunk_size=chunk_size, backend=backend,
            kernel_options=kernel_options,
        ).squeeze(0)  # fmt: skip
    positions = response_positions(labels, ignore_index)
    logp = response_logprobs(
        hidden[positions],
        weight,
        labels[positions],
        bias,
        temperature=temperature,
        chunk_size=chunk_size,
        backend=backend,
        kernel_options=kernel_options,
    )
    return scatter_to_positions(logp, positions, labels.shape)
