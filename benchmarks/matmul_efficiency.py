"""How close the loss head runs to the device's matmul rate.

Times forward + backward of ``fused_linear_logprobs`` on N response rows (8 N H V FLOPs: the
forward's logits, the backward's recomputed logits, grad_rows and grad_weight) and a plain
``(N, H) @ (H, V_tile)`` matmul of the same dtype, interleaved, and prints the head's achieved
rate as a fraction of the matmul rate.

    python benchmarks/matmul_efficiency.py                     # N=4096, H=1024, V=32768, float32
    python benchmarks/matmul_efficiency.py --n 768 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from solopo_kernels import fused_linear_logprobs, value_checks_disabled


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="response rows")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = torch.randn(args.n, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.03).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.n,), device=device)
    tile = weight.detach()[: min(args.vocab, 8192)]

    def head() -> None:
        with value_checks_disabled():
            fused_linear_logprobs(rows, weight, labels).sum().backward()
        rows.grad = weight.grad = None

    def matmul() -> None:
        rows.detach() @ tile.t()

    head(), matmul()  # warm-up (and Triton's autotuning on a GPU)
    head_times, matmul_times = [], []
    for _ in range(args.repeats):
        head_times.append(timed(head, device))
        matmul_times.append(timed(matmul, device))
    head_rate = 8 * args.n * args.hidden * args.vocab / statistics.median(head_times)
    matmul_rate = 2 * args.n * args.hidden * tile.shape[0] / statistics.median(matmul_times)
    print(
        f"N={args.n} H={args.hidden} V={args.vocab} {args.dtype} on {device}: head "
        f"{statistics.median(head_times) * 1e3:.1f} ms = {head_rate / 1e9:.1f} GFLOP/s (8 N H V), "
        f"matmul {matmul_rate / 1e9:.1f} GFLOP/s: {head_rate / matmul_rate:.0%} of the matmul rate"
    )


if __name__ == "__main__":
    main()
