"""Random test inputs shaped like real preference batches: ignored prompt prefixes, response
tokens, ignored right padding. Never zeros."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

IGNORE = -100

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.triton, id="triton"),
]


def skip_unless_backend_runs(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton backend needs the triton package")


def response_labels(rows: int, length: int, vocab: int, *, min_response: int = 1) -> torch.Tensor:
    """``(rows, length)`` labels: a random ignored prefix, a response, a random ignored suffix."""
    labels = torch.full((rows, length), IGNORE, dtype=torch.long)
    for r in range(rows):
        start = int(torch.randint(0, max(1, length - min_response), ()))
        stop = int(torch.randint(start + min_response, length + 1, ()))
        labels[r, start:stop] = torch.randint(0, vocab, (stop - start,))
    return labels


@dataclass
class Head:
    """A random lm_head and float64 leaf copies of it for the reference."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def random(cls, vocab: int, hidden: int, *, bias: bool, dtype=torch.float32) -> Head:
        weight = (torch.randn(vocab, hidden) * hidden**-0.5 * 2).to(dtype).requires_grad_()
        b = (torch.randn(vocab) * 0.5).to(dtype).requires_grad_() if bias else None
        return cls(weight, b)

    def float64(self) -> Head:
        return Head(
            self.weight.detach().double().requires_grad_(),
            self.bias.detach().double().requires_grad_() if self.bias is not None else None,
        )


def random_hidden(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).requires_grad_()


def float64_leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().double().requires_grad_()
