"""Input checks shared by the kernels and the losses.

Shape, dtype and device checks read only tensor metadata and cost nothing on the device. The
checks that read values (label range, empty responses) need one host sync; they are batched into
a single ``.tolist()`` per call and can be switched off for benchmarking with
:func:`value_checks_disabled` or the environment variable ``SOLOPO_KERNELS_SKIP_VALUE_CHECKS=1``.
With value checks off, out-of-range labels are never read out of bounds by the kernels (a target
id outside ``[0, V)`` matches no vocabulary column), but the result for such a row is meaningless.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

_ENV_SKIP = "SOLOPO_KERNELS_SKIP_VALUE_CHECKS"
_value_checks_enabled = True

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def value_checks_enabled() -> bool:
    """Whether the value checks that need a host sync run (default: yes)."""
    return _value_checks_enabled and os.environ.get(_ENV_SKIP, "0") not in ("1", "true", "True")


@contextlib.contextmanager
def value_checks_disabled() -> Iterator[None]:
    """Skip the checks that read tensor values (and so sync with the device), e.g. in benchmarks.

    Shape, dtype and device checks still run: they are free.
    """
    global _value_checks_enabled
    previous = _value_checks_enabled
    _value_checks_enabled = False
    try:
        yield
    finally:
        _value_checks_enabled = previous


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {tensor.dtype}"
        )


def check_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (e.g. torch.long), got {tensor.dtype}")


def check_shape(
    name: str, tensor: torch.Tensor, expected: Sequence[int | None], meaning: str
) -> None:
    """Raise unless ``tensor.shape`` matches ``expected`` (``None`` = any size) of the given rank."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(
        e is not None and s != e for s, e in zip(shape, expected)
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {meaning} = {want}, got {shape}")


def check_same_device(
    reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None
) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), "
                f"got {tensor.device}"
            )


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value}")


def check_labels_and_lengths(
    labels: Sequence[tuple[str, torch.Tensor]],
    vocab_size: int,
    ignore_index: int,
    *,
    require_response: bool,
) -> None:
    """Value checks on label tensors, with one host sync for all of them.

    Every label must be ``ignore_index`` or lie in ``[0, vocab_size)``; with ``require_response``
    every sequence (a row of the last dimension) must hold at least one response label.
    """
    if not value_checks_enabled() or not labels:
        return
    stats = []
    for _, tensor in labels:
        valid = tensor != ignore_index
        # Out-of-range ids among valid positions: counted, not indexed, so nothing is read OOB.
        bad = (valid & ((tensor < 0) | (tensor >= vocab_size))).sum()
        if require_response and tensor.dim() > 0 and tensor.numel() > 0:
            empty = (valid.sum(-1) == 0).sum()
        else:
            empty = torch.zeros((), dtype=torch.long, device=tensor.device)
        stats.append(torch.stack([bad.to(torch.long), empty.to(torch.long)]))
    values = torch.stack([s.to(stats[0].device) for s in stats]).tolist()
    for (name, tensor), (bad, empty) in zip(labels, values):
        if bad:
            raise ValueError(
                f"{name}: {bad} label(s) outside [0, {vocab_size}) that are not ignore_index="
                f"{ignore_index}; labels must be token ids of the lm_head vocabulary"
            )
        if empty:
            rows = (tensor != ignore_index).sum(-1).eq(0).nonzero().flatten().tolist()
            raise ValueError(
                f"{name}: sequence(s) {rows} have no response token (every label is ignore_index="
                f"{ignore_index}); each sequence needs at least one"
            )
