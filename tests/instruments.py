"""Instruments the tests measure with: an allocation recorder and a check that the backend asked
for really ran."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

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


@contextlib.contextmanager
def expect_backend(backend: str, *, backward: bool = True) -> Iterator[None]:
    """Fails unless the Triton kernels launched inside the block when ``backend == "triton"``
    (forward, and the backward tile kernel when ``backward``): a silent fallback must not pass."""
    if backend != "triton":
        yield
        return
    from solopo_kernels.ops import triton_tiles

    before = dict(triton_tiles.launch_counts)
    yield
    ran = {k: triton_tiles.launch_counts[k] - before.get(k, 0) for k in ("forward", "dlogits")}
    assert ran["forward"] > 0, "the Triton forward kernel never ran"
    assert ran["dlogits"] > 0 or not backward, "the Triton backward kernel never ran"
