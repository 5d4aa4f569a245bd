"""The first-use self-check of the Triton backends (``solopo_kernels.ops.self_check``), by fault
injection under the Triton interpreter: the CPU stands in for a CUDA device (``checks_device``
and ``auto_backend`` patched), the check's case is shrunk (still two token tiles and two vocabulary
tiles), and the Triton kernels are made wrong, or made to raise, on purpose.

What must hold: a correct backend passes silently and ``auto`` keeps it; a wrong or raising one
gives one warning (naming what differed, by how much, and the doctor command) and ``auto`` uses
the torch backend from then on; an explicit ``backend="triton"`` raises instead; the environment
switch turns the check off.
"""

from __future__ import annotations

import os
import warnings
from unittest import mock

import pytest
import torch

pytest.importorskip("triton", reason="the self-check checks the Triton backend")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from solopo_kernels import fused_linear_logprobs  # noqa: E402
from solopo_kernels.ops import logprobs as dispatch  # noqa: E402
from solopo_kernels.ops import self_check, triton_tiles  # noqa: E402
from tests import reference  # noqa: E402
from tests.inputs import Head, random_hidden, response_labels  # noqa: E402
from tests.instruments import LaunchCounter  # noqa: E402

pytestmark = pytest.mark.triton
V, H = 150, 32


@pytest.fixture
def on_fake_cuda(monkeypatch):
    """auto picks Triton and calls are self-checked, on the CPU; a small check case; fresh
    verdicts."""
    monkeypatch.setattr(dispatch, "auto_backend", lambda device, dtype=None: "triton")
    monkeypatch.setattr(self_check, "checks_device", lambda device: True)
    monkeypatch.setattr(self_check, "N_ROWS", 40)
    monkeypatch.setattr(self_check, "HIDDEN", 32)
    monkeypatch.setattr(self_check, "VOCAB", 150)
    monkeypatch.setattr(self_check, "CHUNK", (24, 96))
    monkeypatch.setattr(self_check, "_results", {})
    monkeypatch.delenv(self_check.ENV_VAR, raising=False)


def _call(backend="auto", dtype=torch.float32):
    head = Head.random(V, H, bias=True, dtype=dtype)
    hidden = random_hidden(2, 9, H, dtype=dtype)
    labels = response_labels(2, 9, V)
    out = fused_linear_logprobs(hidden, head.weight, labels, head.bias, backend=backend)
    out.sum().backward()
    return out


def _wrong_dlogits(original):
    """The recompute kernel writing dlogits 5% too large: a silently wrong gradient."""

    def launch(dlogits, *args, **kwargs):
        original(dlogits, *args, **kwargs)
        dlogits.mul_(1.05)

    return launch


def test_the_default_case_spans_two_token_and_two_vocabulary_tiles():
    tokens, columns = self_check.CHUNK
    assert tokens < self_check.N_ROWS <= 2 * tokens
    assert columns < self_check.VOCAB <= 2 * columns
    assert self_check.VOCAB % columns and self_check.N_ROWS % tokens  # ragged edges too


def test_a_correct_backend_passes_silently_and_auto_keeps_it(on_fake_cuda):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with LaunchCounter() as ran:
            _call()
    # The check's two runs (2 x 2 tiles each, recomputed or saved) and the call itself.
    assert ran["dlogits"] >= 4 and ran["saved_dlogits"] >= 1 and ran["forward"] >= 3
    assert list(self_check._results.values()) == [None]


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_auto_falls_back_to_torch_with_one_warning(on_fake_cuda, fault):
    if fault == "wrong":
        patch = mock.patch.object(
            triton_tiles, "launch_dlogits", _wrong_dlogits(triton_tiles.launch_dlogits)
        )
    else:
        patch = mock.patch.object(
            triton_tiles, "launch_forward", side_effect=RuntimeError("illegal memory access")
        )
    with patch:
        with pytest.warns(RuntimeWarning) as caught:
            _call()
        message = str(caught[0].message)
        assert len(caught) == 1 and "python -m solopo_kernels.doctor" in message
        assert "Using the torch backend" in message and self_check.ENV_VAR in message
        if fault == "wrong":
            assert "grad_rows differs by" in message and "tolerance 0.0001" in message
        else:
            assert "raised RuntimeError: illegal memory access" in message
        # From then on: the torch backend, no warning, no Triton launch.
        with warnings.catch_warnings(), LaunchCounter() as ran:
            warnings.simplefilter("error")
            _call()
        assert ran["forward"] == ran["dlogits"] == 0


def test_the_fallback_result_is_correct(on_fake_cuda):
    """After the fallback, values and gradients are the torch backend's: right, against float64."""
    head = Head.random(V, H, bias=True)
    hidden = random_hidden(2, 9, H)
    labels = response_labels(2, 9, V)
    with mock.patch.object(
        triton_tiles, "launch_dlogits", _wrong_dlogits(triton_tiles.launch_dlogits)
    ):
        with pytest.warns(RuntimeWarning):
            out = fused_linear_logprobs(hidden, head.weight, labels, head.bias, temperature=0.8)
        grads = torch.autograd.grad(out.sum(), [hidden, head.weight, head.bias])
    ref_head, ref_hidden = head.float64(), hidden.detach().double().requires_grad_()
    ref = reference.token_logps(ref_hidden, ref_head.weight, labels, ref_head.bias, temperature=0.8)
    ref_grads = torch.autograd.grad(ref.sum(), [ref_hidden, ref_head.weight, ref_head.bias])
    reference.assert_close_rel(out, ref, 1e-5, "logp after fallback")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        reference.assert_close_rel(g, r, 1e-5, f"grad {name} after fallback")


def test_explicit_triton_raises_instead_of_falling_back(on_fake_cuda):
    wrong = _wrong_dlogits(triton_tiles.launch_dlogits)
    with mock.patch.object(triton_tiles, "launch_dlogits", wrong):
        for _ in range(2):  # the verdict is kept: it raises every time
            with pytest.raises(self_check.SelfCheckError, match='backend="triton" failed its self-check'):
                _call(backend="triton")


def test_mixed_dtype_heads_are_checked_under_their_own_key(on_fake_cuda):
    head = Head.random(V, H, bias=True)  # float32 weight and bias
    hidden = random_hidden(2, 9, H, dtype=torch.bfloat16)
    labels = response_labels(2, 9, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_linear_logprobs(hidden, head.weight, labels, head.bias).sum().backward()
    assert list(self_check._results) == [("triton", "cpu", torch.bfloat16, torch.float32)]


def test_the_environment_switch_turns_the_check_off(on_fake_cuda, monkeypatch):
    monkeypatch.setenv(self_check.ENV_VAR, "0")
    wrong = _wrong_dlogits(triton_tiles.launch_dlogits)
    with mock.patch.object(triton_tiles, "launch_dlogits", wrong):
        with warnings.catch_warnings(), LaunchCounter() as ran:
            warnings.simplefilter("error")
            _call()
    assert ran["forward"] == 1 and self_check._results == {}


def test_the_check_is_not_fooled_by_the_callers_autocast(on_fake_cuda):
    """Float32 rows under bf16 autocast: the torch reference must stay float32 (else the exact
    tolerance fails and a correct backend is dropped)."""
    head = Head.random(V, H, bias=True)
    hidden = random_hidden(2, 9, H)
    labels = response_labels(2, 9, V)
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")
        fused_linear_logprobs(hidden, head.weight, labels, head.bias)
    assert list(self_check._results.values()) == [None]


def test_a_check_that_raises_is_a_verdict(on_fake_cuda, monkeypatch):
    """An exception inside the check itself (the torch reference running out of memory, say) is
    recorded once, with a warning, not retried on every call."""
    from solopo_kernels.ops import torch_tiles

    monkeypatch.setattr(torch_tiles, "forward", mock.Mock(side_effect=MemoryError("oom")))
    with pytest.warns(RuntimeWarning, match="the check itself raised MemoryError"):
        assert not self_check.triton_passes(
            triton_tiles, "triton", torch.device("cpu"), torch.float32, torch.float32,
            explicit=False,
        )  # fmt: skip
    assert not self_check.triton_passes(
        triton_tiles, "triton", torch.device("cpu"), torch.float32, torch.float32, explicit=False
    )
    assert torch_tiles.forward.call_count == 1
