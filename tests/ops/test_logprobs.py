"""fused_linear_logprobs against the float64 materialised-logits reference.

Tolerances (max |ours - reference| / max |reference|):
* float32 inputs: values and gradients <= 1e-5;
* bfloat16 / float16 inputs: values <= 1e-5 against the reference computed in float64 from the
  same rounded inputs (the kernels accumulate in float32, so only the inputs are rounded), and
  gradients <= 1e-2 (they are returned in the input dtype: one rounding, <= 2^-8 relative).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from solopo_kernels import fused_linear_logprobs
from solopo_kernels.ops import logprobs as dispatch
from tests import reference
from tests.inputs import (
    BACKENDS,
    IGNORE,
    Head,
    float64_leaf,
    random_hidden,
    response_labels,
    skip_unless_backend_runs,
)
from tests.instruments import expect_backend

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def check_against_reference(
    hidden, head, labels, *, temperature=1.0, chunk_size=None, backend="torch", grad_tol=1e-5
):
    with expect_backend(backend):
        out = fused_linear_logprobs(
            hidden,
            head.weight,
            labels,
            head.bias,
            temperature=temperature,
            chunk_size=chunk_size,
            backend=backend,
        )
        upstream = torch.randn(labels.shape)
        params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
        grads = torch.autograd.grad((out * upstream).sum(), params)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert torch.all(out[labels == IGNORE] == 0)
    ref_head = head.float64()
    ref_hidden = float64_leaf(hidden)
    expected = reference.token_logps(
        ref_hidden, ref_head.weight, labels, ref_head.bias, temperature=temperature
    )
    reference.assert_close_rel(out, expected, 1e-5, "log-probs")

    ref_params = [ref_hidden, ref_head.weight] + (
        [ref_head.bias] if ref_head.bias is not None else []
    )
    ref_grads = torch.autograd.grad((expected * upstream.double()).sum(), ref_params)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == params[0].dtype
        reference.assert_close_rel(g, r, grad_tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_values_and_grads(backend, bias, temperature):
    skip_unless_backend_runs(backend)
    head = Head.random(vocab=203, hidden=24, bias=bias)
    hidden = random_hidden(3, 17, 24)
    labels = response_labels(3, 17, 203)
    check_against_reference(
        hidden, head, labels, temperature=temperature, chunk_size=(5, 64), backend=backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    skip_unless_backend_runs(backend)
    head = Head.random(vocab=150, hidden=32, bias=True, dtype=dtype)
    hidden = random_hidden(2, 19, 32, dtype=dtype)
    labels = response_labels(2, 19, 150)
    check_against_reference(
        hidden, head, labels, temperature=0.9, backend=backend, grad_tol=GRAD_TOL[dtype]
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 7, (3, 1), (4, 33), (1000, 1000)])
def test_tile_sizes_do_not_change_the_result(chunk_size):
    head = Head.random(vocab=97, hidden=8, bias=True)
    hidden = random_hidden(2, 11, 8)
    labels = response_labels(2, 11, 97)
    check_against_reference(hidden, head, labels, temperature=1.3, chunk_size=chunk_size)


def test_any_leading_shape_and_extreme_targets():
    head = Head.random(vocab=64, hidden=8, bias=False)
    hidden = random_hidden(2, 3, 5, 8)
    labels = response_labels(6, 5, 64).view(2, 3, 5)
    labels[0, 0, -1] = 63  # the last vocabulary id
    labels[1, 2, -1] = 0
    check_against_reference(hidden, head, labels, chunk_size=(2, 16))
    # A single token and a 1-D input.
    one = random_hidden(1, 8)
    check_against_reference(one, head, torch.tensor([63]))
    check_against_reference(random_hidden(8), head, torch.tensor(17))  # hidden (H,), scalar label


def test_non_contiguous_hidden_and_tied_weight():
    embedding = torch.nn.Embedding(50, 12)
    hidden_full = random_hidden(3, 10, 12)
    hidden = hidden_full[:, :-1]  # the usual shifted slice: not viewable as (N, H)
    assert not hidden.is_contiguous()
    labels = response_labels(3, 9, 50)
    head = Head(embedding.weight, None)
    check_against_reference(hidden, head, labels, chunk_size=(4, 16))


def test_all_positions_ignored_gives_zeros_and_zero_grads():
    head = Head.random(vocab=30, hidden=8, bias=True)
    hidden = random_hidden(2, 4, 8)
    labels = torch.full((2, 4), IGNORE)
    out = fused_linear_logprobs(hidden, head.weight, labels, head.bias)
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_custom_ignore_index():
    head = Head.random(vocab=40, hidden=8, bias=False)
    hidden = random_hidden(2, 6, 8)
    labels = response_labels(2, 6, 40)
    labels[labels == IGNORE] = 7  # 7 is now "ignored", even though it is a valid id
    out = fused_linear_logprobs(hidden, head.weight, labels, ignore_index=7)
    expected = reference.token_logps(hidden, head.weight, labels, ignore_index=7)
    reference.assert_close_rel(out, expected, 1e-5, "log-probs")


def test_gradcheck_float64():
    head = Head.random(vocab=11, hidden=4, bias=True, dtype=torch.float64)
    hidden = random_hidden(2, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 3, 10], [0, IGNORE, 5]])

    def fn(h, w, b):
        return fused_linear_logprobs(
            h, w, labels, b, temperature=0.9, chunk_size=(2, 3), backend="torch"
        )

    assert torch.autograd.gradcheck(fn, (hidden, head.weight, head.bias))


def test_no_grad_runs_the_forward_alone():
    head = Head.random(vocab=40, hidden=8, bias=True)
    hidden = random_hidden(2, 6, 8)
    labels = response_labels(2, 6, 40)
    with mock.patch.object(
        dispatch.LinearLogProbs, "apply", side_effect=AssertionError("autograd used")
    ):
        with torch.no_grad():
            out = fused_linear_logprobs(hidden, head.weight, labels, head.bias)
    assert out.grad_fn is None and not out.requires_grad
    with torch.enable_grad():
        expected = fused_linear_logprobs(hidden, head.weight, labels, head.bias)
    assert torch.equal(out, expected.detach())


def test_auto_backend_is_torch_on_cpu():
    assert dispatch.resolve_backend("auto", torch.device("cpu")).__name__.endswith("torch_tiles")


def test_auto_backend_on_cuda_picks_triton_but_torch_for_float64():
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    assert dispatch.resolve_backend("auto", cuda, torch.float64).__name__.endswith("torch_tiles")
    assert dispatch.resolve_backend("auto", cuda, torch.bfloat16).__name__.endswith("triton_tiles")


def test_a_minus_infinity_bias_masks_columns_without_nan():
    """A bias of -inf masks vocabulary columns (the first one included, which the torch
    backend's per-tile log-sum-exp would otherwise read): values and gradients stay finite and
    match the float64 reference with those columns masked."""
    from tests import reference as ref_module

    vocab, hidden_size = 150, 16
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.randn(vocab)
    bias[[0, 64, 65, 149]] = float("-inf")
    bias.requires_grad_()
    hidden = torch.randn(2, 7, hidden_size, requires_grad=True)
    labels = torch.randint(1, 64, (2, 7))
    out = fused_linear_logprobs(hidden, weight, labels, bias, backend="torch", chunk_size=(4, 64))
    grads = torch.autograd.grad(out.sum(), [hidden, weight])
    expected = ref_module.token_logps(hidden.double(), weight.double(), labels, bias.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    ref_module.assert_close_rel(out, expected, 1e-5, "logp")
