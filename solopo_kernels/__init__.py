"""solopo-kernels: fused, memory-bounded log-prob kernels and losses for long-context preference
optimization (SoLoPO: short-to-long preference optimization, arXiv 2505.11166).

Public API (SPEC §3): :func:`fused_linear_logprobs`, :func:`fused_solopo_loss`,
:class:`FusedSoLoPOLoss`, :func:`solopo_loss` and its output type :class:`SoLoPOOutput`.
"""

from ._version import __version__
from .checks import value_checks_disabled
from .losses import FusedSoLoPOLoss, SoLoPOOutput, fused_solopo_loss, solopo_loss
from .ops import fused_linear_logprobs

__all__ = [
    "FusedSoLoPOLoss",
    "SoLoPOOutput",
    "__version__",
    "fused_linear_logprobs",
    "fused_solopo_loss",
    "solopo_loss",
    "value_checks_disabled",
]
