"""fused_linear_logprobs on real pretrained models: each model's own last hidden states (a chat
conversation for SmolLM2-135M-Instruct, plain text for Gemma-3-270M) and its own tied head
(vocabularies of 49,152 and 262,144), against float64 ``log_softmax`` of the logits.

Tolerances (max |ours - reference| / max |reference|), as in test_logprobs.py:
* float32: values <= 1e-5 against float64 from the same hidden states and head, and <= 1e-5
  against float64 ``log_softmax`` of the model's own float32 logits; gradients <= 1e-5;
* bfloat16 (the whole model in bf16): values <= 1e-5 against float64 from the same bf16 hidden
  states and head (the kernel accumulates in float32; only its inputs are rounded), gradients
  <= 1e-2; and within bf16's rounding of the model's own bf16 logits.

The responses are the last ``R = 8`` tokens (labels -100 elsewhere); the float64 reference runs
over the vocabulary in chunks, so Gemma's costs 8 x 262,144 logits and no float64 copy of its
head.
"""

from __future__ import annotations

import functools

import pytest
import torch

from solopo_kernels import fused_linear_logprobs
from solopo_kernels.pretrained import GEMMA3, SMOLLM2
from tests import reference
from tests.instruments import expect_backend

R = 8
BACKENDS = ["torch", *(["triton"] if torch.cuda.is_available() else [])]
FOLDER_FIXTURES = {SMOLLM2: "smollm2_folder", GEMMA3: "gemma3_folder"}
TEXT = (
    "Maria Okafor was born in Lisbon and works for a shipping company in Rotterdam. She is "
    "married to Tomas Reyes, who trained her as a navigator. Where does Maria Okafor work?"
)


@functools.cache
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@functools.cache
def _model(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), _tokenizer(folder)


def _input_ids(tokenizer) -> torch.Tensor:
    if tokenizer.chat_template:  # SmolLM2-Instruct: the conversation as the model is trained on it
        messages = [
            {"role": "user", "content": TEXT},
            {"role": "assistant", "content": "She works for a shipping company in Rotterdam."},
        ]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    else:  # Gemma-3-270M base: plain text with its BOS
        ids = tokenizer(TEXT + " Answer: a shipping company in Rotterdam.")["input_ids"]
    return torch.tensor([ids])


def _float64_reference(hidden, weight, labels, upstream, dweight, chunk: int = 16384):
    """float64 log-probs ``log_softmax(hidden @ weight.T)[labels]``, their gradient in
    ``hidden`` for the upstream gradient ``upstream``, and the relative error (max |err| /
    max |ref|) of ``dweight`` against theirs in ``weight``, vocabulary chunk by chunk: Gemma's
    float64 head and its gradient would be 2 x 1.3 GB.

    With p = softmax(z) and u the upstream gradient: d/dh = u (W_y - p W),
    d/dW_j = u (1[j = y] - p_j) h.
    """
    h, u = hidden.double(), upstream.double()
    lse = torch.stack(
        [torch.logsumexp(h @ w.double().T, -1) for w in weight.split(chunk)]
    ).logsumexp(0)
    logps = (h * weight[labels].double()).sum(-1) - lse
    dhidden = u[:, None] * weight[labels].double()
    worst = scale = 0.0
    for start, w in zip(range(0, weight.shape[0], chunk), weight.split(chunk), strict=True):
        w = w.double()
        up = u[:, None] * torch.exp(h @ w.T - lse[:, None])  # u p, (n, chunk)
        dhidden -= up @ w
        dw = -up.T @ h
        mine = (labels >= start) & (labels < start + w.shape[0])
        dw.index_add_(0, labels[mine] - start, u[mine, None] * h[mine])
        worst = max(worst, (dweight[start : start + w.shape[0]].double() - dw).abs().max().item())
        scale = max(scale, dw.abs().max().item())
    return logps, dhidden, worst / scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(SMOLLM2, torch.float32, id="smollm2-fp32"),
        pytest.param(SMOLLM2, torch.bfloat16, id="smollm2-bf16"),
        pytest.param(GEMMA3, torch.float32, id="gemma3-fp32"),
        # Gemma in bf16 costs ~40 s more of CI for a path SmolLM2's bf16 case already covers.
        pytest.param(GEMMA3, torch.bfloat16, id="gemma3-bf16", marks=pytest.mark.heavy),
    ],
)
def test_kernel_on_the_models_own_hidden_states_and_head(name, dtype, backend, request):
    folder = request.getfixturevalue(FOLDER_FIXTURES[name])  # converts, or skips without wheels
    model, tokenizer = _model(str(folder), dtype)
    device = "cuda" if backend == "triton" else "cpu"
    model.to(device)
    ids = _input_ids(tokenizer).to(device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden = (
        out.hidden_states[-1].detach().requires_grad_()
    )  # after the final norm: lm_head's input
    weight = model.get_output_embeddings().weight
    assert weight is model.get_input_embeddings().weight  # both models tie their head
    assert weight.dtype == hidden.dtype == dtype
    labels = torch.full_like(ids, -100)
    labels[:, -R - 1 : -1] = ids[:, -R:]  # shifted: position t predicts token t + 1
    upstream = torch.randn(labels.shape, device=device)

    weight_leaf = weight.detach().requires_grad_()
    with expect_backend(backend):
        logps = fused_linear_logprobs(hidden, weight_leaf, labels, backend=backend)
        grads = torch.autograd.grad((logps * upstream).sum(), [hidden, weight_leaf])

    rows = labels[0] != -100
    ref, ref_dhidden, weight_error = _float64_reference(
        hidden.detach()[0, rows], weight.detach(), labels[0, rows], upstream[0, rows], grads[1]
    )

    assert logps.dtype == torch.float32 and (logps[0, ~rows] == 0).all()
    reference.assert_close_rel(logps[0, rows], ref, 1e-5, f"{name} {dtype} log-probs")
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert grads[0].dtype == grads[1].dtype == dtype
    reference.assert_close_rel(grads[0][0, rows], ref_dhidden, grad_tol, "grad hidden")
    assert (grads[0][0, ~rows] == 0).all()
    assert weight_error <= grad_tol, f"grad lm_head: relative error {weight_error:.3g}"

    # And against the model's own logits: float64 log_softmax of what its forward computed.
    logits = out.logits[0, rows].double()
    own = torch.log_softmax(logits, -1).gather(-1, labels[0, rows, None])[:, 0]
    if dtype == torch.float32:
        reference.assert_close_rel(logps[0, rows], own, 1e-5, "vs the model's own logits")
    else:
        # The model's bf16 logits are rounded (<= 2^-9 relative each), which moves a log-softmax
        # by at most twice the largest rounding: 2^-8 max |logit|.
        bound = 2**-8 * logits.abs().max().item()
        assert (logps[0, rows] - own).abs().max().item() <= bound
    model.to("cpu")


def test_the_chunked_float64_reference_is_autograds():
    """The reference above, checked against autograd on float64 logits that it avoids building
    (a vocabulary of 5 chunks, the last one short; labels in several chunks)."""
    n, h, v = 6, 16, 70
    hidden, weight = torch.randn(n, h), torch.randn(v, h)
    labels, upstream = torch.tensor([0, 15, 16, 33, 69, 69]), torch.randn(n)
    ref_hidden = hidden.double().requires_grad_()
    ref_weight = weight.double().requires_grad_()
    logps = torch.log_softmax(ref_hidden @ ref_weight.T, -1).gather(-1, labels[:, None])[:, 0]
    dhidden, dweight = torch.autograd.grad(
        (logps * upstream.double()).sum(), [ref_hidden, ref_weight]
    )

    ours, ours_dhidden, error = _float64_reference(
        hidden, weight, labels, upstream, dweight, chunk=16
    )
    torch.testing.assert_close(ours, logps.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_dhidden, dhidden, rtol=1e-12, atol=1e-12)
    assert error < 1e-12
    wrong = dweight.clone()
    wrong[16, 3] += 1e-3 * dweight.abs().max()  # an error in the second chunk
    assert _float64_reference(hidden, weight, labels, upstream, wrong, chunk=16)[2] > 5e-4
