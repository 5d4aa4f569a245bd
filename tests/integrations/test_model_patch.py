"""The per-instance forward patch: the projection runs in the autocast dtype under autocast (a
float32 head rounded by the kernel tile by tile, never copied whole), and an lm_head weight left
partitioned raises. (Under DeepSpeed ZeRO-3 and the other engines:
test_zero3.py, test_distributed.py.)"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

from solopo_kernels.integrations import model_patch  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture
def model_and_batch():
    tokenizer = tiny_tokenizer("a b c d e f g h".split())
    model = model_patch.patch_solopo_forward(tiny_llama(tokenizer))
    ids = torch.randint(0, len(tokenizer), (2, 10))
    labels = ids.masked_fill(torch.arange(10) < 4, model_patch.IGNORE_INDEX)
    return model, ids, labels


def test_autocast_runs_the_kernel_in_the_autocast_dtype(model_and_batch):
    model, ids, labels = model_and_batch
    reference = model(input_ids=ids, solopo_labels=labels).logps.detach()

    seen = []
    kernel = model_patch.response_logprobs

    def spy(rows, weight, *args, **kwargs):
        seen.append((rows.dtype, weight.dtype))
        return kernel(rows, weight, *args, **kwargs)

    with mock.patch.object(model_patch, "response_logprobs", spy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, solopo_labels=labels)
    assert seen == [(torch.bfloat16, torch.float32)]  # the float32 head is not cast
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, reference, rtol=2e-2, atol=0.0)
    out.logps.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_autocast_makes_no_copy_of_the_head(model_and_batch):
    """Under bf16 autocast nothing of the lm_head's size is allocated in bf16 (the patch used to
    cast the whole float32 head per forward and keep the copy until the backward); the 16-bit
    pieces are vocabulary tiles (8 of the 26 columns here)."""
    from solopo_kernels.integrations.args import HeadKernel
    from tests.instruments import AllocationRecorder

    model, ids, labels = model_and_batch
    model_patch.patch_solopo_forward(model, HeadKernel(chunk_size=(16, 8)))
    head = model.lm_head.weight
    with AllocationRecorder() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, solopo_labels=labels)
        out.logps.sum().backward()
    head_sized = [
        a for a in rec.allocations if a[1] == torch.bfloat16 and a[2] == tuple(head.shape)
    ]
    assert not head_sized, head_sized
    tiles = [a for a in rec.allocations if a[1] == torch.bfloat16 and a[2] == (8, head.shape[1])]
    assert tiles  # the head was used, in bf16, one tile at a time
    assert head.grad is not None and head.grad.dtype == torch.float32


def test_an_ungathered_partition_raises(model_and_batch):
    model, ids, labels = model_and_batch
    # DeepSpeed ZeRO-3 leaves a partitioned parameter's data an empty 1-D tensor.
    model.lm_head.weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"lm_head.weight has shape \(0,\).*ZeRO-3"):
        model(input_ids=ids, solopo_labels=labels)


def test_patching_again_replaces_the_kernel_settings(model_and_batch):
    from solopo_kernels.integrations.args import HeadKernel

    model, ids, labels = model_and_batch
    seen = []
    kernel = model_patch.response_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return kernel(*args, **kwargs)

    with mock.patch.object(model_patch, "response_logprobs", spy):
        model(input_ids=ids, solopo_labels=labels)
        model_patch.patch_solopo_forward(model, HeadKernel(backend="torch", chunk_size=4))
        model(input_ids=ids, solopo_labels=labels)
    assert seen == [None, 4]
    with pytest.raises(TypeError, match="kernel: expected a HeadKernel or None, got dict"):
        model_patch.patch_solopo_forward(model, {"backend": "torch"})


def test_shift_labels_without_solopo_logps_is_refused(model_and_batch):
    model, ids, labels = model_and_batch
    with pytest.raises(ValueError, match="shift_labels: only read with solopo_logps=True"):
        model(input_ids=ids, solopo_labels=labels, shift_labels=labels)


@pytest.mark.parametrize("bias", [False, True])
def test_logit_sums_equal_the_sum_of_the_heads_logits(model_and_batch, bias):
    """``solopo_logit_sums=True`` returns each row's sum of the logits over every position and the
    whole vocabulary (what LLaMA-Factory's ``logits/chosen`` averages) without computing them,
    through a logit scale (the kernel's temperature) and a bias."""
    model, ids, labels = model_and_batch
    if bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(model.lm_head.out_features))
    model_patch.patch_solopo_forward(model)
    model._solopo_head = (0.5, model._solopo_head[1])  # as a logit scale of 2 would give
    out = model(input_ids=ids, solopo_labels=labels, solopo_logit_sums=True)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state.double()
        head = model.lm_head.double()
        expected = (head(hidden) / 0.5).sum((1, 2))
        model.lm_head.float()
    assert out.logit_sums.dtype == torch.float32 and not out.logit_sums.requires_grad
    torch.testing.assert_close(out.logit_sums.double(), expected, rtol=1e-5, atol=1e-4)
    assert model(input_ids=ids, solopo_labels=labels).logit_sums is None


def test_logit_sums_need_padded_labels(model_and_batch):
    model, ids, labels = model_and_batch
    with pytest.raises(ValueError, match="solopo_logit_sums: only meaningful together"):
        model(input_ids=ids, solopo_logit_sums=True)
    with pytest.raises(ValueError, match="solopo_logit_sums: only computed for padded rows"):
        model(
            input_ids=ids,
            solopo_labels=labels,
            solopo_sequence_ids=torch.zeros_like(ids),
            solopo_logit_sums=True,
        )
