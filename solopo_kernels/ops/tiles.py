"""How one log-prob call is cut into tiles: the user's knobs (:class:`KernelOptions`) and
the geometry a backend derives from them at forward time and reuses in the backward
(:class:`Tiles`).

The forward saves one log-sum-exp per row and keeps the float32 logits of the first
``saved_columns`` vocabulary columns of every row, as many as fit in what is left of
``KernelOptions.saved_logits_bytes`` (by default :data:`DEFAULT_SAVED_LOGITS_BYTES`, 256 MiB), a
budget for the saved logits alive on a device, all calls together (:mod:`.saved_logits`: the
short, long and packed forwards of a training step share it); the backward reads those tiles
instead of recomputing them, and recomputes the rest. A small step (``4 N V`` bytes within the
budget) runs at ``6 N H V`` FLOPs; a long one saves what fits and recomputes tile by tile,
towards ``8 N H V``; memory stays within the budget of the recomputing kernels'. ``KernelOptions(saved_logits_bytes=0)`` keeps nothing of size ``N x V``:
the strict minimal-memory kernels. Saved tiles hold the forward's own float32 values (the Triton
backend its logits, the torch backend their log-probabilities), so the result is as exact either
way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .saved_logits import SavedLogitsBudget

# Saved logits are float32 whatever the input dtype: a 16-bit logit would put an error of
# |logit| * 2**-8 into every probability.
SAVED_LOGITS_BYTES_PER_ELEMENT = 4
# A partial saved region is a multiple of this many columns (GEMM-friendly tile edges).
SAVED_COLUMNS_ALIGN = 64
# The default saved-logits budget. Big enough that a short step keeps all of its N x V logits
# (N = 8192 response tokens at V = 8192, or N = 512 at V = 128K), small next to a 7B model's
# weights and activations; the recompute it saves is a quarter of the head's GEMM work.
DEFAULT_SAVED_LOGITS_BYTES = 256 << 20


@dataclass(frozen=True)
class KernelOptions:
    """Knobs of the log-prob kernels; every setting is exact.

    Attributes:
        saved_logits_bytes: the most bytes of float32 logits kept from forwards for their
            backwards that may be alive on a device at once, all kernel calls together (default
            :data:`DEFAULT_SAVED_LOGITS_BYTES`, 256 MiB; 0: none, every tile is recomputed, the
            strict minimal-memory kernels). A call saves what is left of it when its forward
            runs, and gives it back when its backward has consumed it (:mod:`.saved_logits`), so
            the forwards of one training step (short rows, long rows, packed rows; a reference
            forward keeps nothing) share one budget. Within it the backward skips the recompute
            of the saved tiles, trading ``4 N`` bytes per vocabulary column for ``2 N H`` FLOPs;
            ``4 * N * V`` bytes (``N`` response tokens) saves all of one call's. Values and
            gradients are the same either way, to the kernels' tolerances. Both backends.
        skip_threshold: CCE-style gradient filtering (default 0.0: off, exact). The Triton
            backward skips the two gradient GEMMs of every ``[token_tile, vocab_tile]`` tile whose
            largest ``|dlogits| = |g * (onehot - softmax)| / temperature`` is below it (one host
            sync per tile). Values are exact; each gradient entry is off by at most what was
            dropped: ``eps * (skipped columns) * max|W|`` for the hidden states, ``eps * N *
            max|rows|`` for the weight and ``eps * N`` for the bias. Pays only with tiles small
            enough to be uniformly negligible (``chunk_size``). The torch backend computes every
            tile.
    """

    saved_logits_bytes: int = DEFAULT_SAVED_LOGITS_BYTES
    skip_threshold: float = 0.0

    def __post_init__(self) -> None:
        value = self.saved_logits_bytes
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"saved_logits_bytes: expected an int >= 0 (bytes), got {value!r}")
        eps = self.skip_threshold
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"skip_threshold: expected a finite number >= 0, got {eps!r}")


    @property
    def saved_logits_budget(self) -> SavedLogitsBudget:
        """The saved-logits policy these options select (:mod:`.saved_logits`): a fixed budget of
        ``saved_logits_bytes`` per device."""
        from .saved_logits import SavedLogitsBudget

        return SavedLogitsBudget(self.saved_logits_bytes)


def check_kernel_options(options: object) -> KernelOptions:
    """``options`` as a :class:`KernelOptions` (None gives the defaults)."""
    if options is None:
        return KernelOptions()
    if not isinstance(options, KernelOptions):
        raise TypeError(
            f"kernel_options: expected a solopo_kernels.ops.KernelOptions or None, got "
            f"{type(options).__name__}"
        )
    return options


def saved_columns(budget_bytes: int, n_rows: int, vocab: int) -> int:
    """How many leading vocabulary columns of ``n_rows`` rows fit in ``budget_bytes`` of float32
    logits: all ``vocab`` if they fit, else a multiple of :data:`SAVED_COLUMNS_ALIGN` (0 when
    not even one block fits)."""
    if n_rows <= 0 or budget_bytes <= 0:
        return 0
    columns = budget_bytes // (SAVED_LOGITS_BYTES_PER_ELEMENT * n_rows)
    if columns >= vocab:
        return vocab
    return columns // SAVED_COLUMNS_ALIGN * SAVED_COLUMNS_ALIGN


@dataclass(frozen=True)
class Tiles:
    """Geometry of one call, fixed at forward time and reused by its backward.

    Attributes:
        token_tile, vocab_tile: shape of a backward tile (rows, vocabulary columns).
        saved_columns: the forward keeps the float32 logits of columns ``[0, saved_columns)`` of
            every row (see :class:`KernelOptions`); 0 = nothing saved.
        saved_token_tile: token rows of a backward tile inside the saved columns, when a backend
            can take taller tiles there at no memory cost (0: ``token_tile``).
        splits: vocabulary splits of the Triton forward grid (1 for the torch backend).
        skip_threshold: opt-in gradient filter of the Triton backend (:class:`KernelOptions`);
            0 = exact.
        dot_precision: ``tl.dot`` input precision of the Triton kernels, chosen at forward time
            so that the backward recomputes the same logits (``"ieee"`` for the torch backend).
    """

    token_tile: int
    vocab_tile: int
    saved_columns: int = 0
    saved_token_tile: int = 0
    splits: int = 1
    skip_threshold: float = 0.0
    dot_precision: str = "ieee"


def tile_bounds(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into consecutive ``(lo, hi)`` pieces of ``step`` (the last ragged)."""
    return [(lo, min(lo + step, stop)) for lo in range(start, stop, step)]


def vocab_bounds(tiles: Tiles, vocab: int, vocab_tile: int) -> list[tuple[int, int]]:
    """The vocabulary tiles of a call: the saved columns and the rest are tiled separately, so
    that every tile is either wholly saved or wholly recomputed."""
    edge = min(tiles.saved_columns, vocab)
    return tile_bounds(0, edge, vocab_tile) + tile_bounds(edge, vocab, vocab_tile)
