"""One saved-logits budget for every kernel call whose saved logits are alive at the same time.

The forward of a call may keep float32 logits for its backward (:class:`.tiles.KernelOptions`,
``saved_logits_bytes``), which then skips their recompute. A training step makes several calls
before its backward runs: the short rows, the long rows, one per packed row (a reference forward
runs without autograd and keeps nothing); each call's saved logits live until its backward
consumes them. A budget per call would let one step keep ``calls x budget``. So the budget bounds
the saved logits *alive on a device, all calls together*: a call saves what the budget has left
when its forward runs (the first calls of a step get the most), and gives the bytes back as soon as
its backward has consumed them, or when its graph is freed without a backward. Across steps (and
gradient-accumulation micro-steps) that is one budget per step: every backward gives back what its
forward took.

Two parts:

* :class:`SavedLogitsBudget`, the *policy*: how many leading vocabulary columns a call of ``N``
  rows may save, given the bytes already held on its device. The default is a fixed number of
  bytes (``KernelOptions.saved_logits_bytes``, 256 MiB); a policy that sizes the budget otherwise
  (with the step's rows, or the free device memory) is a subclass that overrides
  :meth:`SavedLogitsBudget.columns`, and is the one place to change.
* :class:`SavedLogitsLedger`, the *accounting*: the bytes held per device, taken by
  :meth:`~SavedLogitsLedger.reserve` and given back when the saved tensor is freed. One ledger per
  process (:data:`LEDGER`), because the resource is: the memory of the device, which every call
  shares whatever options object it was given. Thread-safe (backwards run in autograd's threads).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from .tiles import SAVED_LOGITS_BYTES_PER_ELEMENT, saved_columns

__all__ = ["LEDGER", "Reservation", "SavedLogitsBudget", "SavedLogitsLedger"]


@dataclass(frozen=True)
class SavedLogitsBudget:
    """The default policy: at most ``limit_bytes`` of saved float32 logits alive on a device.

    Attributes:
        limit_bytes: the budget (``KernelOptions.saved_logits_bytes``); 0 saves nothing.
    """

    limit_bytes: int

    def columns(self, n_rows: int, vocab: int, in_use: int) -> int:
        """Leading vocabulary columns a call of ``n_rows`` rows may save when ``in_use`` bytes of
        saved logits are already alive on its device: as many as the rest of the budget holds
        (all ``vocab``, or a multiple of :data:`.tiles.SAVED_COLUMNS_ALIGN`, or 0)."""
        return saved_columns(max(0, self.limit_bytes - in_use), n_rows, vocab)


class Reservation:
    """Bytes a call took from the ledger for the saved logits of one forward: ``columns`` of
    ``n_rows`` rows. :meth:`hold` ties them to the saved tensor (given back when it is freed);
    :meth:`release` gives them back now. Either, once."""

    def __init__(self, ledger: SavedLogitsLedger, device: str, columns: int, nbytes: int) -> None:
        self.columns, self.nbytes = columns, nbytes
        self._release = _Once(ledger, device, nbytes)

    def hold(self, saved: torch.Tensor | None) -> None:
        """Give the bytes back when ``saved`` (the forward's saved logits) is freed: when the
        backward has consumed it, or its graph is gone. None: nothing was saved, give back now."""
        if saved is None:
            self.release()
        else:
            weakref.finalize(saved, self._release)

    def release(self) -> None:
        self._release()


class _Once:
    """The ledger's release of one reservation, run at most once (by :meth:`Reservation.release`
    or by the finalizer of the saved tensor). Holds no reference to the tensor."""

    def __init__(self, ledger: SavedLogitsLedger, device: str, nbytes: int) -> None:
        self.ledger, self.device, self.nbytes = ledger, device, nbytes
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.ledger._give_back(self.device, self.nbytes)


class SavedLogitsLedger:
    """Bytes of saved logits alive per device (keys ``str(device)``), and their peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        self._peak: dict[str, int] = {}

    def in_use(self, device: torch.device | str) -> int:
        """Bytes of saved logits alive on ``device`` now."""
        with self._lock:
            return self._in_use.get(str(device), 0)

    def in_use_by_device(self) -> dict[str, int]:
        """Bytes of saved logits alive now, per device that ever held any."""
        with self._lock:
            return dict(self._in_use)

    def peak(self, device: torch.device | str) -> int:
        """The most bytes alive on ``device`` at once since :meth:`reset_peak` (or the start)."""
        with self._lock:
            return self._peak.get(str(device), 0)

    def reset_peak(self, device: torch.device | str) -> None:
        with self._lock:
            key = str(device)
            self._peak[key] = self._in_use.get(key, 0)

    def reserve(
        self,
        budget: SavedLogitsBudget,
        device: torch.device | str,
        n_rows: int,
        vocab: int,
        most_columns: int,
    ) -> Reservation:
        """Take, atomically, the bytes of the leading columns a call of ``n_rows`` rows may save
        on ``device``: what ``budget`` allows given the bytes in use, at most ``most_columns``
        (what the call's tiles asked for)."""
        key = str(device)
        with self._lock:
            in_use = self._in_use.get(key, 0)
            columns = min(most_columns, budget.columns(n_rows, vocab, in_use))
            nbytes = SAVED_LOGITS_BYTES_PER_ELEMENT * n_rows * columns
            self._in_use[key] = in_use + nbytes
            self._peak[key] = max(self._peak.get(key, 0), in_use + nbytes)
        return Reservation(self, key, columns, nbytes)

    def _give_back(self, device: str, nbytes: int) -> None:
        with self._lock:
            self._in_use[device] = self._in_use.get(device, 0) - nbytes


# The process's ledger: every call on a device shares that device's memory, whatever options it
# was given.
LEDGER = SavedLogitsLedger()
