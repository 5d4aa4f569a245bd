"""Mixed dtypes: a float32 lm_head weight (and bias) with bf16/fp16 hidden states, as autocast
training with float32 master weights has. Both backends round the head to the hidden dtype tile
by tile (the Triton kernels in registers), so the reference is float64 computed from the
rounded head; the weight and bias gradients come back in float32.

Tolerances (max |err| / max |ref|): values <= 1e-5, gradients <= 1e-2 (as for 16-bit inputs).
Also here: the budget (no allocation of the weight's size besides its float32 gradient: the head
is never copied whole), a non-contiguous bias, and the tuning key of the autotuned kernels.
"""

from __future__ import annotations

import pytest
import torch

from solopo_kernels import fused_linear_logprobs
from tests import reference
from tests.inputs import BACKENDS, Head, random_hidden, response_labels, skip_unless_backend_runs
from tests.instruments import AllocationRecorder, expect_backend

V, H = 150, 40


def _rounded_reference(hidden, head, labels, dtype, temperature):
    """float64 log-probs and gradients from the head rounded to ``dtype`` (autocast's head)."""
    ref_hidden = hidden.detach().double().requires_grad_()
    weight = head.weight.detach().to(dtype).double().requires_grad_()
    bias = head.bias.detach().to(dtype).double().requires_grad_()
    out = reference.token_logps(ref_hidden, weight, labels, bias, temperature=temperature)
    return out, (ref_hidden, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_head_with_16_bit_hidden_states_matches_float64(backend, dtype):
    skip_unless_backend_runs(backend)
    head = Head.random(V, H, bias=True)  # float32
    hidden = random_hidden(3, 11, H, dtype=dtype)
    labels = response_labels(3, 11, V)
    upstream = torch.randn(labels.shape)
    with expect_backend(backend):
        out = fused_linear_logprobs(
            hidden, head.weight, labels, head.bias, temperature=0.8, backend=backend,
            chunk_size=(16, 64),  # several token and vocabulary tiles
        )  # fmt: skip
        grads = torch.autograd.grad((out * upstream).sum(), [hidden, head.weight, head.bias])
    ref, leaves = _rounded_reference(hidden, head, labels, dtype, 0.8)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), leaves)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    reference.assert_close_rel(out, ref, 1e-5, "logp")
    assert grads[0].dtype == dtype
    assert grads[1].dtype == grads[2].dtype == torch.float32  # the master weights' dtype
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        reference.assert_close_rel(got, want, 1e-2, f"grad {name}")
    # The rounding matters: the unrounded float32 head gives other values.
    unrounded = reference.token_logps(
        hidden.detach().double(), head.weight.detach().double(), labels,
        head.bias.detach().double(), temperature=0.8,
    )  # fmt: skip
    assert reference.max_relative_error(out, unrounded) > 5e-5  # 5x the tolerance above


@pytest.mark.parametrize(
    "hidden_dtype, weight_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float64),
    ],
)
def test_other_dtype_pairs_are_refused_by_name(hidden_dtype, weight_dtype):
    weight = torch.randn(V, H).to(weight_dtype)
    hidden = torch.randn(2, 5, H).to(hidden_dtype)
    labels = response_labels(2, 5, V)
    with pytest.raises(TypeError, match=r"hidden: expected the dtype of weight .*float32 weight"):
        fused_linear_logprobs(hidden, weight, labels)


def test_the_head_is_never_copied_whole():
    """Torch backend (the CPU path): with several vocabulary tiles, nothing of the weight's size
    is allocated except its float32 gradient; the 16-bit copies are one tile each."""
    vocab, hidden_size, tile = 2048, 64, (32, 256)
    head = Head.random(vocab, hidden_size, bias=True)
    hidden = random_hidden(2, 40, hidden_size, dtype=torch.bfloat16)
    labels = response_labels(2, 40, vocab)
    with AllocationRecorder() as rec:
        out = fused_linear_logprobs(
            hidden, head.weight, labels, head.bias, backend="torch", chunk_size=tile
        )
        out.sum().backward()
    size = head.weight.numel()
    large = [a for a in rec.allocations if torch.Size(a[2]).numel() >= size]
    assert [dtype for _, dtype, _ in large] == [torch.float32], large  # the gradient only
    half = [a for a in rec.allocations if a[1] == torch.bfloat16]
    assert half and max(torch.Size(a[2]).numel() for a in half) <= tile[1] * hidden_size


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_contiguous_bias_is_read_by_its_strides(backend):
    skip_unless_backend_runs(backend)
    head = Head.random(V, H, bias=False)
    bias = (torch.randn(2 * V) * 0.5)[::2].requires_grad_()
    assert not bias.is_contiguous()
    hidden = random_hidden(2, 7, H)
    labels = response_labels(2, 7, V)
    with expect_backend(backend):
        out = fused_linear_logprobs(hidden, head.weight, labels, bias, backend=backend)
        (grad_bias,) = torch.autograd.grad(out.sum(), [bias])
    ref_bias = bias.detach().double().requires_grad_()
    ref = reference.token_logps(
        hidden.detach().double(), head.weight.detach().double(), labels, ref_bias
    )
    (ref_grad,) = torch.autograd.grad(ref.sum(), [ref_bias])
    reference.assert_close_rel(out, ref, 1e-5, "logp")
    reference.assert_close_rel(grad_bias, ref_grad, 1e-5, "grad bias")


def test_the_tuning_key_holds_every_flag_that_changes_a_configs_fitness(monkeypatch):
    """A config pruned for one case (saved logits, bias, dot precision, tile skipping) must not
    be reused for another from the tuner's cache: the flags are part of the key."""
    pytest.importorskip("triton")
    from solopo_kernels.ops import triton_configs, triton_kernels, triton_tma_tiles

    monkeypatch.setattr(triton_configs, "INTERPRET", False)
    forward = triton_configs.autotuned(
        triton_kernels.even_k(triton_kernels.forward_kernel), triton_configs.CONFIGS,
        name="forward",
    )  # fmt: skip
    dlogits = triton_configs.autotuned(
        triton_kernels.even_k(triton_kernels.dlogits_kernel), triton_configs.CONFIGS,
        name="dlogits",
    )  # fmt: skip
    tma = triton_configs.autotuned(
        triton_tma_tiles._tma_forward_kernel, triton_tma_tiles.TMA_CONFIGS, triton_configs.CONFIGS,
        name="tma_forward",
    )  # fmt: skip
    flags = ["HAS_BIAS", "ROUND_HEAD"]
    assert forward.keys == ["H", "V", "ROWS", *flags, "SAVE_LOGITS", "DOT_PRECISION"]
    assert dlogits.keys == ["H", "V", "ROWS", *flags, "TRACK_MAX", "DOT_PRECISION"]
    # Descriptors carry no dtype Triton reads: the TMA kernels name it.
    assert tma.keys == [*forward.keys, "ROWS_DTYPE"]


def test_the_solopo_loss_with_a_float32_head_equals_the_loss_with_its_bf16_copy():
    """The loss API takes the mixed pair too: a float32 head with bf16 hidden states gives the
    loss of the bf16-rounded head (the same rounding, per tile), and a float32 weight gradient
    equal to the bf16 head's (within its rounding)."""
    from solopo_kernels import fused_solopo_loss

    head = Head.random(V, H, bias=True)
    short = random_hidden(4, 9, H, dtype=torch.bfloat16)
    long_ = random_hidden(2, 13, H, dtype=torch.bfloat16)
    short_labels, long_labels = response_labels(4, 9, V), response_labels(2, 13, V)
    rounded_w = head.weight.detach().bfloat16().requires_grad_()
    rounded_b = head.bias.detach().bfloat16().requires_grad_()
    kwargs = dict(loss_type="simpo", beta=2.0, alpha=0.5, backend="torch")
    mixed = fused_solopo_loss(
        head.weight, short, short_labels, long_, long_labels, head.bias, **kwargs
    )
    same = fused_solopo_loss(
        rounded_w, short, short_labels, long_, long_labels, rounded_b, **kwargs
    )
    reference.assert_close_rel(mixed.loss, same.loss, 1e-5, "loss")
    (grad_mixed,) = torch.autograd.grad(mixed.loss, [head.weight])
    (grad_same,) = torch.autograd.grad(same.loss, [rounded_w])
    assert grad_mixed.dtype == torch.float32
    reference.assert_close_rel(grad_mixed, grad_same.double(), 1e-2, "grad weight")
