"""The per-instance forward patch under autocast: the projection runs in the autocast dtype."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

from solopo_kernels.integrations import model_patch  # noqa: E402
from solopo_kernels.testing import tiny_llama, tiny_tokenizer  # noqa: E402


def test_autocast_runs_the_kernel_in_the_autocast_dtype():
    tokenizer = tiny_tokenizer("a b c d e f g h".split())
    model = model_patch.patch_solopo_forward(tiny_llama(tokenizer))
    ids = torch.randint(0, len(tokenizer), (2, 10))
    labels = ids.masked_fill(torch.arange(10) < 4, model_patch.IGNORE_INDEX)
    reference = model(input_ids=ids, solopo_labels=labels).logps.detach()

    seen = []
    kernel = model_patch.fused_linear_logprobs

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return kernel(hidden, weight, *args, **kwargs)

    with mock.patch.object(model_patch, "fused_linear_logprobs", spy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, solopo_labels=labels)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, reference, rtol=2e-2, atol=0.0)
    out.logps.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
