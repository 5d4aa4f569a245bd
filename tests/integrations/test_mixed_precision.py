"""Mixed precision in the trainer: every SoLoPO forward (policy and reference) runs under the
autocast that accelerate gives the model's own forward, and the first bf16 loss is the one the
model's own bf16 forward gives (not the float32 one)."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations import trl as solopo_trl  # noqa: E402
from tests import reference  # noqa: E402
from tests.integrations import common  # noqa: E402


def _record_autocast(model: torch.nn.Module, name: str, seen: list) -> None:
    """Record, at every call of the first decoder layer, whether autocast is on and its dtype."""

    def hook(module, args):
        on = torch.is_autocast_enabled("cpu")
        seen.append((name, torch.get_autocast_dtype("cpu") if on else None))

    model.model.layers[0].register_forward_pre_hook(hook)


@pytest.mark.parametrize(
    ("reference", "padding_free"),
    [("model", False), ("model", True), ("precomputed by the policy", False)],
)
def test_bf16_runs_every_solopo_forward_under_autocast(tmp_path, reference, padding_free):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    precompute = reference != "model"
    seen: list = []
    _record_autocast(policy, "policy", seen)
    _record_autocast(ref, "reference", seen)
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=policy,
        ref=None if precompute else ref,
        solopo_loss_type="dpo",
        bf16=True,
        max_steps=1,
        padding_free=padding_free,
        precompute_ref_log_probs=precompute,
    )
    at_init = list(seen)
    seen.clear()
    trainer.train()
    # Padded: two forwards each (short, long); packed: one. The precomputed reference is scored
    # by the policy before training (2 batches of 2 pairs, 2 forwards each).
    forwards = 1 if padding_free else 2
    if precompute:
        assert at_init == [("policy", torch.bfloat16)] * 4
        assert seen == [("policy", torch.bfloat16)] * forwards
    else:
        assert at_init == []
        assert (
            seen
            == [("policy", torch.bfloat16)] * forwards + [("reference", torch.bfloat16)] * forwards
        )


def test_fp16_runs_the_solopo_forwards_under_fp16_autocast(tmp_path, monkeypatch):
    # accelerate refuses fp16 on the CPU; its state is switched to fp16 after a bf16 build, which
    # is what accelerate's autocast context reads.
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    seen: list = []
    _record_autocast(policy, "policy", seen)
    _record_autocast(ref, "reference", seen)
    trainer = common.trainer(tmp_path, tok=tok, policy=policy, ref=ref, bf16=True)
    monkeypatch.setattr(trainer.accelerator.state, "_mixed_precision", "fp16")
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1]))
    assert torch.isfinite(loss)
    assert seen == [("policy", torch.float16)] * 2 + [("reference", torch.float16)] * 2


def _float64_loss(policy, ref, tok) -> float:
    """The dpo objective from the models' own full logits, everything in float64, row by row."""
    with torch.no_grad():
        return common.reference_loss(
            copy.deepcopy(policy).double(),
            copy.deepcopy(ref).double(),
            tok,
            common.ROWS,
            loss_type="dpo",
            beta=0.5,
            alpha=1.0,
        ).item()


def _bf16_loss(policy, ref, batch) -> float:
    """The dpo objective as a bf16 autocast run computes it, by hand on the collated first batch
    (``reference.autocast_batch_logps``: the body under autocast on the padded batches the trainer
    runs, the head exact from bf16-rounded inputs). Rows ``[chosen..., rejected...]`` short, the
    chosen ones long (the float32 tests check this batch against row-by-row tokenization)."""
    short_logps, short_lengths = reference.autocast_batch_logps(policy, batch)
    long_logps, long_lengths = reference.autocast_batch_logps(policy, batch, prefix="long_")
    loss, _, _ = reference.solopo_objective(
        short_logps,
        short_lengths,
        long_logps,
        long_lengths,
        ref_short_logps=reference.autocast_batch_logps(ref, batch)[0],
        ref_long_logps=reference.autocast_batch_logps(ref, batch, prefix="long_")[0],
        loss_type="dpo",
        beta=0.5,
        alpha=1.0,
    )
    return loss.item()


def test_first_bf16_loss_is_the_bf16_forward_not_the_float32_one(tmp_path):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    float64_loss = _float64_loss(policy, ref, tok)
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=policy,
        ref=ref,
        bf16=True,
        max_steps=1,
        per_device_train_batch_size=4,  # the first step is the whole dataset
    )
    first_batch = common.batch(trainer, list(range(len(trainer.train_dataset))))
    bf16_loss = _bf16_loss(policy, ref, first_batch)  # before training moves the policy
    trainer.train()
    first = trainer.state.log_history[0]["loss"]
    # Within bf16 error of the exact value, and the bf16 forward's value to float32 rounding (the
    # float32 patched forward gives the exact value to 1e-6; bf16 moves it by 2-4e-4).
    assert abs(first - float64_loss) <= 2**-8 * abs(float64_loss)
    gap = abs(bf16_loss - float64_loss)
    assert gap > 1e-4, "the check needs bf16 to move this loss"
    assert abs(first - bf16_loss) <= 1e-6 + 0.01 * gap, (first, bf16_loss, float64_loss)


@pytest.mark.parametrize(
    ("native_amp", "is_fsdp2", "expected"),
    [(True, False, "accelerate"), (False, False, None), (True, True, None)],
)
def test_forward_autocast_follows_the_engine(native_amp, is_fsdp2, expected):
    """accelerate's autocast where it wraps the model's forward (native AMP); none under DeepSpeed
    (native_amp is off) or FSDP2 (MixedPrecisionPolicy casts the weights instead)."""
    marker = contextlib.nullcontext("accelerate")
    accelerator = SimpleNamespace(native_amp=native_amp, is_fsdp2=is_fsdp2, autocast=lambda: marker)
    with solopo_trl.forward_autocast(accelerator) as entered:
        assert entered == expected


@pytest.mark.slow
def test_bf16_with_smollm2_runs_its_decoder_layers_under_autocast(tmp_path):
    """The way users run it: SmolLM2-135M-Instruct (float32 weights), its chat template,
    ``bf16=True``; a hook on the first decoder layer sees bf16 autocast in both forwards of an
    evaluation step (short and long rows; forward only, to keep the test cheap: the tiny-model
    tests above cover training), and the loss is finite."""
    from datasets import Dataset

    from solopo_kernels.pretrained import load_pretrained
    from tests.pretrained_models import folder_or_skip

    folder_or_skip("smollm2-135m-instruct")
    model, tok = load_pretrained("smollm2-135m-instruct")
    seen: list = []
    _record_autocast(model, "policy", seen)

    def chat(context):
        return [{"role": "user", "content": f"{context}\n\nWhere was Jonas Berg born?"}]

    fact = "Jonas Berg was born in Bergen and lives in Oslo."
    distractor = "Lena Park was born in Busan. She works for a shipping company in Seoul."
    data = Dataset.from_list(
        [
            {
                "prompt": chat(fact),
                "long_prompt": chat(f"{distractor}\n\n{fact}\n\n{distractor}"),
                "chosen": [{"role": "assistant", "content": "Bergen."}],
                "rejected": [{"role": "assistant", "content": "Oslo."}],
            }
        ]
        * 2
    )
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=model,
        ref=None,
        data=data,
        solopo_loss_type="simpo",
        beta=2.0,
        bf16=True,
        per_device_eval_batch_size=2,
    )
    metrics = trainer.evaluate(data)
    assert seen == [("policy", torch.bfloat16)] * 2
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
