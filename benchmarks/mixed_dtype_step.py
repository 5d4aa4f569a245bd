"""Wall time of one forward+backward of the torch backend with bf16 hidden states and a float32
head (autocast training with float32 master weights, on the CPU path).

    python benchmarks/mixed_dtype_step.py                 # N=2048, H=512, V=32768
    python benchmarks/mixed_dtype_step.py 4096 1024 32768 # N H V

Median of 7 runs after 2 warm-ups, ``fused_linear_logprobs(..., backend="torch")`` with the
default kernel options. Made to compare the backward before and after a change (the one that
dropped a per-tile copy of the weight that nothing read); run it on a quiet machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package of this checkout

import torch  # noqa: E402

from solopo_kernels import fused_linear_logprobs  # noqa: E402


def main(argv: list[str]) -> int:
    n, h, v = (int(x) for x in (argv[:3] if len(argv) >= 3 else (2048, 512, 32768)))
    torch.manual_seed(0)
    hidden = torch.randn(n, h).bfloat16().requires_grad_()
    weight = (torch.randn(v, h) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))

    def step() -> None:
        out = fused_linear_logprobs(hidden, weight, labels, backend="torch")
        out.sum().backward()
        hidden.grad = weight.grad = None

    for _ in range(2):
        step()
    times = []
    for _ in range(7):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    median = statistics.median(times) * 1e3
    print(f"N={n} H={h} V={v}, bf16 rows, float32 head: median forward+backward {median:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
