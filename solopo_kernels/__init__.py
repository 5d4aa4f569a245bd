"""solopo-kernels: fused, memory-bounded log-prob kernels and losses for long-context preference
optimization (SoLoPO: short-to-long preference optimization, arXiv 2505.11166).

Public API (documented in docs/api.md): :func:`fused_linear_logprobs`, :func:`fused_solopo_loss`,
:class:`FusedSoLoPOLoss`, :func:`solopo_loss` and its output type :class:`SoLoPOOutput`,
:class:`SoLoPOOptions` (the loss options as one value, the ``options`` argument) and
:class:`KernelOptions` (the kernels' opt-in settings, the ``kernel_options`` argument).
The names are imported on first use, so ``solopo_kernels.data`` (pure Python) does not pull in
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_PUBLIC = {
    "fused_linear_logprobs": ".ops",
    "fused_solopo_loss": ".losses",
    "FusedSoLoPOLoss": ".losses",
    "KernelOptions": ".ops",
    "solopo_loss": ".losses",
    "SoLoPOOptions": ".losses",
    "SoLoPOOutput": ".losses",
    "value_checks_disabled": ".checks",
}

__all__ = [
    "FusedSoLoPOLoss",
    "KernelOptions",
    "SoLoPOOptions",
    "SoLoPOOutput",
    "__version__",
    "fused_linear_logprobs",
    "fused_solopo_loss",
    "solopo_loss",
    "value_checks_disabled",
]

if TYPE_CHECKING:
    from .checks import value_checks_disabled
    from .losses import (
        FusedSoLoPOLoss,
        SoLoPOOptions,
        SoLoPOOutput,
        fused_solopo_loss,
        solopo_loss,
    )
    from .ops import KernelOptions, fused_linear_logprobs


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
