"""pytest-benchmark suite: regression tracking of the loss head at two shapes.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``, and ``bench_*.py`` matches no
test-file pattern; the functions are named ``test_*`` so that pytest collects them once the file
is given by path)::

    pytest benchmarks/bench_head.py --benchmark-autosave          # save a baseline
    pytest benchmarks/bench_head.py --benchmark-compare --benchmark-compare-fail=median:10%

Each benchmark is one forward+backward of ``fused_linear_logprobs`` (the primitive) or
``fused_solopo_loss`` (the SoLoPO head: short pair + long chosen row) with the default backend
of the device; the peak memory above the inputs goes to ``extra_info["peak_mib"]`` (CPU: peak RSS,
as in ``harness.py``; CUDA: ``max_memory_allocated``), so a memory regression shows up in the
saved JSON too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# The sibling modules, whatever pytest's import mode (pytest 9 may not put this folder on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CudaTracker, RssTracker, make_tracker  # noqa: E402
from peers import PEERS, Workload, leaves, make_inputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (kind, T or Tl, response tokens per row, H, V): a small shape that tracks overheads and a
# mid-size one that tracks the GEMM-bound regime; GPU shapes are Llama-3-8B's head.
SHAPES = {
    "cpu": [("logprobs", 4096, 512, 512, 8192), ("solopo", 8192, 256, 1024, 32768)],
    "cuda": [("logprobs", 16384, 4096, 4096, 128256), ("solopo", 32768, 2048, 4096, 128256)],
}
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"


@pytest.fixture(scope="module", autouse=True)
def honest_rss() -> None:
    """Give every allocation of 128 KiB or more its own mapping (returned to the OS when freed),
    so that RSS follows live tensors; ``harness.py`` does the same through the environment."""
    libc_name = ctypes.util.find_library("c")
    if DEVICE.type == "cpu" and libc_name:
        m_mmap_threshold = -3
        ctypes.CDLL(libc_name).mallopt(m_mmap_threshold, 128 * 1024)


def _case(shape: tuple[str, int, int, int, int]) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    kind, length, response, hidden, vocab = shape
    workload = Workload(kind, length, min(1024, length), response, hidden, vocab, dtype=DTYPE)
    inputs = make_inputs(workload, DEVICE)
    return PEERS["ours"].build(workload, inputs, DEVICE), leaves(inputs)


@pytest.mark.parametrize(
    "shape", SHAPES[DEVICE.type], ids=lambda s: f"{s[0]}-T{s[1]}-R{s[2]}-H{s[3]}-V{s[4]}"
)
def test_head_forward_backward(benchmark: Any, shape: tuple[str, int, int, int, int]) -> None:
    step, grads = _case(shape)
    tracker: RssTracker | CudaTracker = make_tracker(DEVICE)

    def clear() -> None:
        for tensor in grads:
            tensor.grad = None
        gc.collect()

    clear()
    step()  # warm-up (Triton compilation on the GPU)
    clear()
    baseline = tracker.start()
    step()
    benchmark.extra_info["peak_mib"] = (tracker.peak() - baseline) / 2**20
    benchmark.extra_info["device"] = str(DEVICE)

    def run() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, setup=clear, rounds=5 if DEVICE.type == "cuda" else 3, iterations=1)
