"""Liger's kernels next to SoLoPOTrainer, with Liger's real patches on the tiny Llama.

On the CPU, Liger's Triton kernels run only under ``TRITON_INTERPRET=1`` (which
``tests/conftest.py`` sets without CUDA), and there only its RoPE does: its RMSNorm and SwiGLU
fail inside the interpreter. So RoPE is run next to the patched forward and compared with the
unpatched model (loss and gradients to 1e-5 relative; the kernels compute in float32 either way),
with counters proving that Liger's RoPE (forward and backward) and this package's log-prob kernel
ran; RMSNorm and SwiGLU are checked to be refused at construction with the option named; Liger's
fused linear cross-entropy (which does run in the interpreter) is checked to stay out of SoLoPO's
way: never called for the log-probs, same loss and gradients.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")
pytest.importorskip("liger_kernel", reason="liger-kernel (the bench extra) is not installed")

from solopo_kernels.integrations import liger, model_patch  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama  # noqa: E402
from tests import reference  # noqa: E402
from tests.integrations import common  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs Liger's Triton kernels on the CPU, under TRITON_INTERPRET=1"
)


@pytest.fixture
def llama_globals():
    """Liger patches transformers' Llama module (classes, the RoPE function, the causal LM's
    forward) for the whole process: put everything back after each test."""
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama as llama

    saved = {
        name: getattr(llama, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    }
    forward = llama.LlamaForCausalLM.forward
    cross_entropy = loss_utils.nn.functional.cross_entropy
    yield llama
    for name, value in saved.items():
        setattr(llama, name, value)
    llama.LlamaForCausalLM.forward = forward
    loss_utils.nn.functional.cross_entropy = cross_entropy


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts Liger's RoPE forward/backward, its fused linear cross-entropy forward and this
    package's log-prob kernel, by wrapping the functions their callers look up at call time."""
    import liger_kernel.ops.fused_linear_cross_entropy as flce_ops
    import liger_kernel.ops.rope as rope_ops

    counter: Counter = Counter()

    def counted(module: Any, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(rope_ops, "rope_forward")
    counted(rope_ops, "rope_backward")
    counted(flce_ops, "fused_linear_cross_entropy_forward")
    counted(model_patch, "response_logprobs")
    return counter


def _tiny(tok: Any) -> torch.nn.Module:
    # One layer: Liger's RoPE runs in Triton's interpreter, one program per token.
    return tiny_llama(tok, num_layers=1)


def _trainer(path: Path, tok: Any, policy: torch.nn.Module, **overrides: Any) -> Any:
    """SoLo-SimPO (no reference forwards, so fewer interpreted kernels), 2 pairs a step."""
    options = dict(solopo_loss_type="simpo", per_device_train_batch_size=2, max_steps=1)
    return common.trainer(path, tok=tok, policy=policy, ref=None, **{**options, **overrides})


def _class_patched_copy(tok: Any, model: torch.nn.Module, **kernels: bool) -> torch.nn.Module:
    """What Axolotl's Liger plugin does: Liger's class-level Llama patches, then the model is
    built (here with ``model``'s weights)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    options = dict(rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False)
    apply_liger_kernel_to_llama(**{**options, **kernels})
    patched = _tiny(tok)
    patched.load_state_dict(model.state_dict())
    return patched


def _loss_and_grads(trainer: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, common.batch(trainer, [0, 1]))
    loss.backward()
    return loss.detach(), {
        "lm_head": model.lm_head.weight.grad.clone(),
        "q_proj": model.model.layers[0].self_attn.q_proj.weight.grad.clone(),
        "norm": model.model.norm.weight.grad.clone(),
    }


def _assert_same_step(got: tuple, expected: tuple, what: str) -> None:
    reference.assert_close_rel(got[0], expected[0], 1e-5, f"{what}: loss")
    for name, grad in expected[1].items():
        reference.assert_close_rel(got[1][name], grad, 1e-5, f"{what}: {name} gradient")


@needs_interpreter
def test_class_level_liger_rope_runs_inside_the_patched_forward(tmp_path, llama_globals, calls):
    tok = common.tokenizer()
    policy = _tiny(tok)
    liger_policy = copy.deepcopy(policy)
    plain = _loss_and_grads(_trainer(tmp_path / "plain", tok, policy))
    assert calls["rope_forward"] == 0

    liger_policy = _class_patched_copy(tok, liger_policy, rope=True)
    assert set(liger.liger_kernels_in(liger_policy)) == {"rope"}
    trainer = _trainer(tmp_path / "liger", tok, liger_policy)
    calls.clear()
    got = _loss_and_grads(trainer)

    # Short and long rows: Liger's RoPE ran forward and backward, and the log-probs came from
    # this package's kernel.
    assert calls["rope_forward"] > 0 and calls["rope_backward"] > 0, calls
    assert calls["response_logprobs"] > 0, calls
    _assert_same_step(got, plain, "Liger RoPE")


@needs_interpreter
def test_use_liger_kernel_applies_rope_and_keeps_the_patched_forward(
    tmp_path, llama_globals, calls
):
    tok = common.tokenizer()
    policy = _tiny(tok)
    plain = _trainer(tmp_path / "plain", tok, copy.deepcopy(policy))
    plain.train()
    trainer = _trainer(
        tmp_path / "liger",
        tok,
        policy,
        use_liger_kernel=True,
        liger_kernel_config={"rope": True, "rms_norm": False, "swiglu": False},
    )
    # transformers would otherwise give the instance Liger's fused linear cross-entropy forward
    # when training starts, replacing the patched forward.
    assert trainer.args.liger_kernel_config["fused_linear_cross_entropy"] is False
    calls.clear()
    trainer.train()

    assert llama_globals.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert calls["rope_forward"] > 0 and calls["rope_backward"] > 0, calls
    assert calls["response_logprobs"] > 0 and calls["fused_linear_cross_entropy_forward"] == 0
    # The instance forward is still SoLoPO's patch, not one of Liger's.
    assert getattr(trainer.model, model_patch._PATCHED_FLAG)
    assert not liger.liger_kernels_in(trainer.model).get("fused_linear_cross_entropy")
    losses = [
        [log["loss"] for log in t.state.log_history if "loss" in log] for t in (trainer, plain)
    ]
    assert len(losses[0]) == 1
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    for name, weight in plain.model.named_parameters():
        reference.assert_close_rel(
            dict(trainer.model.named_parameters())[name], weight, 1e-5, f"{name} after a step"
        )


@needs_interpreter
def test_class_level_fused_linear_cross_entropy_is_never_called(tmp_path, llama_globals, calls):
    tok = common.tokenizer()
    policy = _tiny(tok)
    plain = _loss_and_grads(_trainer(tmp_path / "plain", tok, copy.deepcopy(policy)))
    liger_policy = _class_patched_copy(tok, policy, fused_linear_cross_entropy=True)
    liger_forward = llama_globals.LlamaForCausalLM.forward
    assert liger_forward.__module__.startswith("liger_kernel")
    assert set(liger.liger_kernels_in(liger_policy)) == {"fused_linear_cross_entropy"}
    trainer = _trainer(tmp_path / "liger", tok, liger_policy)
    calls.clear()
    got = _loss_and_grads(trainer)

    assert calls["response_logprobs"] > 0 and calls["fused_linear_cross_entropy_forward"] == 0
    _assert_same_step(got, plain, "Liger FLCE patch")
    # The class forward is Liger's, and the counter sees it: a plain call with labels (not
    # SoLoPO's log-probs) runs Liger's fused loss.
    assert type(trainer.model).forward is liger_forward
    ids = common.batch(trainer, [0])["input_ids"]
    assert torch.isfinite(trainer.model(input_ids=ids, labels=ids).loss)
    assert calls["fused_linear_cross_entropy_forward"] == 1


@pytest.mark.parametrize(
    ("kernel", "key"), [("rms_norm", "liger_rms_norm"), ("swiglu", "liger_glu_activation")]
)
def test_class_level_layer_kernel_that_cannot_run_here_is_refused(
    tmp_path, llama_globals, kernel, key
):
    if torch.cuda.is_available():
        pytest.skip("Liger's kernels run on CUDA; the refusal is for other devices")
    tok = common.tokenizer()
    policy = _class_patched_copy(tok, _tiny(tok), **{kernel: True})
    with pytest.raises(ValueError, match=rf"(?s)cannot run on this cpu device.*{key}: false"):
        _trainer(tmp_path, tok, policy)


def test_use_liger_kernel_defaults_are_refused_where_they_cannot_run(tmp_path, llama_globals):
    if torch.cuda.is_available():
        pytest.skip("Liger's kernels run on CUDA; the refusal is for other devices")
    with pytest.raises(ValueError) as refused:
        common.trainer(tmp_path, use_liger_kernel=True)
    message = str(refused.value)
    # Liger's default Llama kernels: RMSNorm and SwiGLU fail on this CPU (RoPE runs only under
    # the interpreter), each named with the way to turn it off.
    for kernel in ("rms_norm", "swiglu"):
        assert f'liger_kernel_config={{"{kernel}": False}}' in message, message
    assert ('{"rope": False}' in message) is not INTERPRETED, message
    assert "use_liger_kernel" in message
    # Nothing was patched: the refusal came before the trainer existed.
    assert not llama_globals.apply_rotary_pos_emb.__module__.startswith("liger_kernel")


def test_liger_fused_linear_cross_entropy_on_the_instance_is_refused(tmp_path):
    with pytest.raises(ValueError, match="liger_kernel_config: .*fused_linear_cross_entropy"):
        common.trainer(
            tmp_path,
            use_liger_kernel=True,
            liger_kernel_config={"fused_linear_cross_entropy": True},
        )


def test_instance_level_patches_are_found(llama_globals):
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    model = tiny_llama(common.tokenizer())
    assert liger.liger_kernels_in(model) == {}
    # What transformers does with use_liger_kernel when training starts.
    apply_liger_kernel_to_llama(model=model, rope=True, fused_linear_cross_entropy=True)
    found = liger.liger_kernels_in(model)
    assert set(found) == {"rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"}, found
    assert "LigerRMSNorm" in found["rms_norm"] and "LigerSwiGLUMLP" in found["swiglu"]


def test_without_the_interpreter_the_cpu_refusal_names_the_triton_error(tmp_path):
    """The issue's case: ``use_liger_kernel=True`` on a CPU host without ``TRITON_INTERPRET``
    (a fresh process: Triton reads the variable when the kernels are defined)."""
    script = textwrap.dedent(
        """
        from types import SimpleNamespace
        import torch
        from solopo_kernels.integrations.liger import check_liger
        from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer

        model = tiny_llama(tiny_tokenizer(["a"]))
        args = SimpleNamespace(
            use_liger_kernel=True, liger_kernel_config={"rope": True}, device=torch.device("cpu")
        )
        try:
            check_liger(args, model)
        except ValueError as error:
            print(error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for kernel in ("rope", "rms_norm", "swiglu"):
        assert f'liger_kernel_config={{"{kernel}": False}}' in out.stdout, out.stdout
    assert "0 active drivers" in out.stdout, out.stdout
