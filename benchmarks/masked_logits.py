"""Errors of the log-prob kernels on masked vocabularies, against a float64 reference.

    python benchmarks/masked_logits.py                 # torch backend, and Triton in its interpreter

A bias of ``-inf``, ``-1e30``, ``finfo(float32).min`` or ``-1e9`` on vocabulary columns where the
online log-sum-exp starts a piece (the first column of a tile, of a split), on whole tiles and
splits, on a padded tail; and the review's case (``-1e30`` at columns 0 and 256, ``chunk_size=(8,
256)``, V = 512). Prints, per backend, case and mask, the largest error of a log-prob in nats,
and ``max |ours - float64| / max |float64|`` of the log-probs and of the gradients of the hidden
states, weight and bias (``nan`` if any value is NaN). The tests (``tests/ops/test_masked_logits.py``) hold every entry to 1e-5; this script shows
the numbers, e.g. for a before/after comparison of a kernel change. CPU only, about a minute.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package of this checkout

import torch  # noqa: E402

from solopo_kernels import KernelOptions, fused_linear_logprobs  # noqa: E402

MASKS = {
    "-inf": -math.inf,
    "-1e30": -1e30,
    "finfo.min": torch.finfo(torch.float32).min,
    "-1e9": -1e9,
}
# (vocab, masked columns, chunk_size, vocabulary splits of the Triton forward)
CASES = {
    "review case: columns 0 and 256": (512, [0, 256], (8, 256), 1),
    "every tile/block/split start": (150, [0, 32, 64, 96, 128], (8, 64), 3),
    "a whole tile": (150, list(range(64, 128)), (8, 64), 3),
    "a whole split": (150, list(range(0, 64)), (8, 64), 3),
    "the last split (padded tail)": (150, list(range(128, 150)), (8, 64), 3),
    "a tail from mid-tile": (150, list(range(117, 150)), (8, 64), 3),
}
H, ROWS = 16, 24


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.nan
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def errors(backend: str, vocab: int, masked: list[int], mask: float, chunk, splits: int):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, H, generator=generator)
    weight = torch.randn(vocab, H, generator=generator) * 0.5
    bias = torch.randn(vocab, generator=generator) * 0.5
    bias[masked] = mask
    allowed = torch.tensor(sorted(set(range(vocab)) - set(masked)))
    labels = allowed[torch.randint(0, len(allowed), (ROWS,), generator=generator)]
    upstream = torch.randn(ROWS, generator=generator)
    temperature = 1.0 if mask == torch.finfo(torch.float32).min else 0.8

    def run(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad((out * upstream.to(dtype)).sum(), leaves)]

    def reference(h, w, b):
        logits = (h @ w.T + b) / temperature
        return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)

    def ours(h, w, b):
        return fused_linear_logprobs(
            h, w, labels, b, temperature=temperature, chunk_size=chunk, backend=backend,
            kernel_options=KernelOptions(saved_logits_bytes=0),
        )  # fmt: skip

    context = mock.patch("solopo_kernels.ops.triton_tiles._device_splits", lambda *a: splits)
    with context if backend == "triton" else mock.MagicMock():
        try:
            got = run(torch.float32, ours)
        except Exception as error:  # a raise is a result too
            return f"raised {type(error).__name__}"
    want = run(torch.float64, reference)
    nats = (got[0].double() - want[0]).abs().max().item()
    return [nats] + [relative_error(a, e) for a, e in zip(got, want)]


def main() -> int:
    backends = ["torch"]
    try:
        import triton  # noqa: F401

        backends.append("triton")
    except ImportError:
        pass
    print(
        "| backend | case | mask | logp error (nats) | logp | grad hidden | grad weight | grad bias |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for backend in backends:
        for case, (vocab, masked, chunk, splits) in CASES.items():
            for name, mask in MASKS.items():
                result = errors(backend, vocab, masked, mask, chunk, splits)
                cells = [result] if isinstance(result, str) else [f"{e:.2g}" for e in result]
                print(f"| {backend} | {case} | {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
