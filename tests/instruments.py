"""Instruments the tests measure with: an allocation recorder and a check that the backend asked
for really ran."""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (outputs that do not alias an
    input: views and in-place results are not allocations), and the peak of the bytes those
    allocations keep alive together (a storage counts until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, str]] = []
        # (op, dtype, shape) of each allocation, in order.
        self.allocations: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.live_bytes = 0
        self.peak_live_bytes = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, outputs):
            if ret.alias_info is None and isinstance(value, torch.Tensor):
                self.sizes.append((value.numel(), str(func)))
                self.allocations.append((str(func), value.dtype, tuple(value.shape)))
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._tracked:
            return
        self._tracked.add(key)
        self.live_bytes += storage.nbytes()
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    @property
    def largest(self) -> tuple[int, str]:
        return max(self.sizes)


class LaunchCounter:
    """Counts the Triton kernel launches (and the tiles skipped by the opt-in filter) made while
    it is entered, by wrapping the backends' launch functions: ``counter["forward"]``,
    ``["dlogits"]``, ``["saved_dlogits"]``, ``["tma_forward"]``, ``["tma_dlogits"]``,
    ``["tma_fallback"]`` and ``["skipped_tiles"]``. A kind that never ran reads 0."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]

    def _wrap(self, module: object, name: str, kind: str, when=None) -> None:
        original = getattr(module, name)

        def counted(*args, **kwargs):
            result = original(*args, **kwargs)
            if when is None or when(result):
                self.counts[kind] += 1
            return result

        self._stack.enter_context(mock.patch.object(module, name, counted))

    def __enter__(self) -> LaunchCounter:
        from solopo_kernels.ops import triton_tiles, triton_tma_tiles

        self._wrap(triton_tiles, "launch_forward", "forward")
        self._wrap(triton_tiles, "launch_dlogits", "dlogits")
        self._wrap(triton_tiles, "launch_saved_dlogits", "saved_dlogits")
        self._wrap(triton_tiles, "tile_is_negligible", "skipped_tiles", when=bool)
        self._wrap(triton_tma_tiles, "launch_tma_forward", "tma_forward")
        self._wrap(triton_tma_tiles, "launch_tma_dlogits", "tma_dlogits")
        self._wrap(triton_tma_tiles, "pointer_fallback", "tma_fallback")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


# Entered for the whole test session by tests/conftest.py (when triton imports): running totals
# of every launch kind, for tests that compare counts before and after a call.
SESSION_LAUNCHES = LaunchCounter()


def launch_totals() -> Counter[str]:
    """Launches by kind since the session started (all 0 when triton is absent)."""
    return SESSION_LAUNCHES.counts


@contextlib.contextmanager
def expect_backend(backend: str, *, backward: bool = True) -> Iterator[None]:
    """Fails unless the Triton kernels launched inside the block when ``backend == "triton"``
    (forward, and a backward tile kernel, recomputing or reading saved logits, when
    ``backward``): a silent fallback must not pass."""
    if backend != "triton":
        yield
        return
    with LaunchCounter() as ran:
        yield
    assert ran["forward"] > 0, "the Triton forward kernel never ran"
    backward_ran = ran["dlogits"] + ran["saved_dlogits"]  # recomputed or saved tiles
    assert backward_ran > 0 or not backward, "the Triton backward kernel never ran"


class SavedLogitsProbe:
    """The saved logits the backends' forwards return, and the peak of their bytes alive at once
    (each counts until it is freed), measured on the tensors themselves, independently of the
    package's own ledger. ``probe.calls``: bytes saved per forward, in order."""

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self.calls: list[int] = []
        self._alive: set[int] = set()  # ids of the saved tensors counted (the TMA forward's
        # fallback returns the pointer forward's tensor: counted once)
        self._stack = contextlib.ExitStack()

    def _release(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live_bytes -= nbytes

    def _wrap(self, module: object) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            logp, lse, saved = original(*args, **kwargs)
            if saved is not None and id(saved) in self._alive:
                return logp, lse, saved
            nbytes = 0 if saved is None else saved.numel() * saved.element_size()
            self.calls.append(nbytes)
            if saved is not None:
                self._alive.add(id(saved))
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                weakref.finalize(saved, self._release, id(saved), nbytes)
            return logp, lse, saved

        self._stack.enter_context(mock.patch.object(module, "forward", forward))

    def __enter__(self) -> SavedLogitsProbe:
        from solopo_kernels.ops import torch_tiles

        self._wrap(torch_tiles)
        try:
            from solopo_kernels.ops import triton_tiles, triton_tma_tiles
        except ImportError:
            return self
        self._wrap(triton_tiles)
        self._wrap(triton_tma_tiles)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
