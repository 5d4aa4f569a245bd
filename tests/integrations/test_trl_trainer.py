"""SoLoPOTrainer against a float64 full-logits computation of the objective, and short training runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations.trl import SoLoPOTrainer  # noqa: E402
from tests import reference  # noqa: E402
from tests.integrations import common  # noqa: E402

LOSS_METRICS = {
    "preference_loss",
    "alignment_loss",
    "num_tokens",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/long_chosen",
    "solo_ra/distance",
    "logps/chosen",
    "logps/rejected",
    "logps/long_chosen",
}


def _loss_and_grads(
    trainer: SoLoPOTrainer, indices: list[int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, common.batch(trainer, indices))
    loss.backward()
    grads = {
        "lm_head": model.lm_head.weight.grad.clone(),
        "q_proj": model.model.layers[0].self_attn.q_proj.weight.grad.clone(),
    }
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("loss_type", "ra_target", "ra_gradient"),
    [
        *(
            (loss, target, "both")
            for loss in ("dpo", "simpo", "orpo")
            for target in ("chosen", "both")
        ),
        ("dpo", "both", "long"),
        ("simpo", "chosen", "long"),
    ],
)
def test_loss_and_gradient_match_float64_full_logits(tmp_path, loss_type, ra_target, ra_gradient):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    policy64, ref64 = copy.deepcopy(policy).double(), copy.deepcopy(ref).double()
    options = dict(
        beta=0.5,
        alpha=1.5,
        gamma=0.3,
        ra_target=ra_target,
        ra_distance="abs",
        ra_gradient=ra_gradient,
    )
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=policy,
        ref=ref if loss_type == "dpo" else None,
        solopo_loss_type=loss_type,
        solopo_alpha=options["alpha"],
        gamma=options["gamma"],
        solopo_ra_target=ra_target,
        solopo_ra_gradient=ra_gradient,
        beta=options["beta"],
    )
    if loss_type != "dpo":
        assert trainer.ref_model is None  # reference-free: none loaded, kept or run
    loss, grads = _loss_and_grads(trainer, [0, 1, 2, 3])

    expected = common.reference_loss(
        policy64,
        ref64 if loss_type == "dpo" else None,
        tok,
        common.ROWS,
        loss_type=loss_type,
        **options,
    )
    expected.backward()
    reference.assert_close_rel(loss, expected.detach(), 2e-6, f"{loss_type}/{ra_target} loss")
    reference.assert_close_rel(grads["lm_head"], policy64.lm_head.weight.grad, 1e-5, "lm_head grad")
    reference.assert_close_rel(
        grads["q_proj"], policy64.model.layers[0].self_attn.q_proj.weight.grad, 1e-5, "q_proj grad"
    )


@pytest.mark.parametrize("loss_type", ["orpo", "cpo"])
def test_the_token_averaged_nll_term_matches_float64_full_logits(tmp_path, loss_type):
    """solopo_nll_average="token": the NLL term over all chosen response tokens of the batch
    (chosen responses of 4 and 8 tokens here, so the two averages differ)."""
    rows = [
        (r[0], r[1], r[2] + (" on the old shelf" if i % 2 else ""), r[3])
        for i, r in enumerate(common.ROWS)
    ]
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    policy64 = copy.deepcopy(policy).double()
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=policy,
        ref=None,
        data=common.dataset(rows),
        solopo_loss_type=loss_type,
        solopo_nll_average="token",
        beta=0.5,
    )
    loss, grads = _loss_and_grads(trainer, [0, 1, 2, 3])
    expected = common.reference_loss(
        policy64, None, tok, rows, loss_type=loss_type, beta=0.5, nll_average="token"
    )
    expected.backward()
    reference.assert_close_rel(loss, expected.detach(), 2e-6, f"{loss_type} token-NLL loss")
    reference.assert_close_rel(grads["lm_head"], policy64.lm_head.weight.grad, 1e-5, "lm_head")
    sequence = common.reference_loss(
        copy.deepcopy(policy).double(), None, tok, rows, loss_type=loss_type, beta=0.5
    )
    assert abs(sequence.item() - expected.item()) > 1e-3  # the option changed the loss


def test_alpha_zero_needs_no_long_prompt_and_is_the_preference_loss(tmp_path):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    data = common.dataset().remove_columns("long_prompt")
    trainer = common.trainer(tmp_path, tok=tok, policy=policy, ref=ref, data=data, solopo_alpha=0.0)
    batch = common.batch(trainer, [0, 1, 2, 3])
    assert not any(k.startswith("long_") for k in batch)
    loss = trainer.compute_loss(trainer.model, batch)
    expected = common.reference_loss(
        copy.deepcopy(policy).double(),
        copy.deepcopy(ref).double(),
        tok,
        common.ROWS,
        beta=0.5,
        alpha=0.0,
    )
    reference.assert_close_rel(loss.detach(), expected, 2e-6, "alpha=0 loss")


def test_training_lowers_loss_keeps_finite_and_logs_metrics(tmp_path):
    trainer = common.trainer(
        tmp_path,
        solopo_loss_type="dpo",
        max_steps=8,
        learning_rate=2e-2,
        per_device_train_batch_size=4,
        gradient_checkpointing=True,  # non-reentrant (the default) with two policy forwards per step
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8
    assert LOSS_METRICS <= set(logs[0])
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05, [h["loss"] for h in logs]
    assert all(math.isfinite(v) for h in logs for v in h.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # The two parts of the objective, and the tokens run so far (short and long rows; every
    # step here is the whole dataset: 4 pairs per step).
    for h in logs:
        total = h["preference_loss"] + 1.0 * h["alignment_loss"]  # solopo_alpha = 1
        assert abs(total - h["loss"]) <= 1e-4 * abs(h["loss"]), h
    batch = common.batch(trainer, [0, 1, 2, 3])
    per_step = int(batch["attention_mask"].sum() + batch["long_attention_mask"].sum())
    assert [h["num_tokens"] for h in logs] == [per_step * (i + 1) for i in range(8)]


def test_predict_returns_the_loss_and_metrics_and_evaluate_logs_them(tmp_path):
    trainer = common.trainer(tmp_path, per_device_eval_batch_size=4)
    trainer.model.eval()
    expected = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1, 2, 3]))
    trainer._metrics["eval"].clear()
    output = trainer.predict(common.dataset())  # raw rows: prepared like evaluate() prepares them
    assert output.predictions is None and output.label_ids is None
    assert abs(output.metrics["test_loss"] - expected.item()) <= 1e-6 * abs(expected.item())
    for name in ("test_preference_loss", "test_alignment_loss", "test_rewards/chosen"):
        assert name in output.metrics, sorted(output.metrics)
    metrics = trainer.evaluate(common.dataset())
    assert abs(metrics["eval_loss"] - expected.item()) <= 1e-6 * abs(expected.item())
    assert "eval_preference_loss" in metrics and "eval_solo_ra/distance" in metrics


def test_predict_after_training_with_precomputed_references_and_no_reference_model(tmp_path):
    """The reference is then the policy as it was when the trainer was built: a new dataset can be
    scored before training (the rewards are 0), not after (TRL's rule and message, for predict()
    as for evaluate()); the eval dataset given at construction keeps its initial reference."""
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    initial64 = copy.deepcopy(policy).double()
    trainer = SoLoPOTrainer(
        model=policy,
        args=common.config(
            tmp_path,
            precompute_ref_log_probs=True,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            learning_rate=2e-2,
            max_steps=2,
        ),
        train_dataset=common.dataset(),
        eval_dataset=common.dataset(),
        processing_class=tok,
    )
    assert trainer.ref_model is None
    before = trainer.predict(common.dataset()).metrics
    assert abs(before["test_rewards/chosen"]) < 1e-6 and abs(before["test_rewards/margins"]) < 1e-6
    assert abs(before["test_loss"] - math.log(2)) < 1e-6  # reference = policy: nothing learnt yet

    trainer.train()
    refused = r"Cannot compute reference log-probs for a dataset passed to `{}\(\)` after training"
    with pytest.raises(ValueError, match=refused.format("predict")):
        trainer.predict(common.dataset())
    with pytest.raises(ValueError, match=refused.format("evaluate")):
        trainer.evaluate(common.dataset())

    # The eval dataset precomputed at construction: scored against the initial policy.
    expected = common.reference_loss(
        copy.deepcopy(trainer.model).double(), initial64, tok, common.ROWS, beta=0.5, alpha=1.0
    ).item()
    after = trainer.predict(trainer.eval_dataset).metrics
    assert abs(after["test_loss"] - expected) <= 1e-5 * abs(expected), (after, expected)
    assert after["test_rewards/margins"] > 1e-3  # trained away from the reference
    assert abs(trainer.evaluate()["eval_loss"] - expected) <= 1e-5 * abs(expected)


def test_eval_num_tokens_counts_the_evaluated_tokens_not_the_training_ones(tmp_path):
    trainer = common.trainer(
        tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2
    )
    trainer.train()
    batch = common.batch(trainer, [0, 1, 2, 3])
    per_batch = int(batch["attention_mask"].sum() + batch["long_attention_mask"].sum())
    assert trainer.state.log_history[1]["num_tokens"] == 2 * per_batch  # two training steps
    for _ in range(2):  # each evaluation counts its own batches
        assert trainer.evaluate(common.dataset())["eval_num_tokens"] == per_batch
    assert trainer.predict(common.dataset()).metrics["test_num_tokens"] == per_batch


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_run_raises_no_checkpointing_deprecation_warning(tmp_path, checkpointing):
    """transformers 5.25 deprecates the gradient_checkpointing* model methods; TRL's
    disable_gradient_checkpointing, which the reference forward used, read them at every call,
    checkpointing on or not (a FutureWarning in every run)."""
    import warnings

    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    args = common.config(tmp_path, gradient_checkpointing=checkpointing, max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SoLoPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=common.dataset(),
            processing_class=tok,
        )
        trainer.train()
        trainer.evaluate(common.dataset())
    deprecated = [str(w.message) for w in caught if "checkpointing" in str(w.message).lower()]
    assert not deprecated, deprecated


def test_the_trainers_own_peft_checks_do_not_import_deepspeed():
    """accelerate's is_peft_model imports DeepSpeed where it is installed (which, without CUDA,
    logs "Setting accelerator to CPU"); the trainer's own checks do not (TRL's DPOTrainer still
    calls accelerate's, so a run imports it once anyway: tests/conftest.py sets DS_ACCELERATOR)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    code = (
        "import sys\n"
        "from solopo_kernels.integrations.trl import _is_peft\n"
        "from tests.integrations import common\n"
        "policy, _ = common.model_pair(common.tokenizer())\n"
        "assert not _is_peft(policy)\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_the_model_card_names_solopo(tmp_path):
    trainer = common.trainer(tmp_path, solopo_loss_type="simpo", ref=None)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "SoLoPO" in card and "2505.11166" in card
    assert "2305.18290" not in card  # not DPO's paper


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "cpo"])
def test_reference_free_types_load_no_reference_and_read_no_weights(
    tmp_path, monkeypatch, loss_type
):
    import trl.trainer.dpo_trainer as dpo

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} was called for a reference-free loss type")

        return call

    # TRL 1.16 hashes every weight of the model it would precompute with (the policy when it has
    # no reference), and loads a reference from the model's path when it is given none.
    hashed = []
    monkeypatch.setattr(dpo, "hash_module", lambda m: hashed.append(m) or "h", raising=False)
    monkeypatch.setattr(dpo, "create_model_from_path", forbidden("create_model_from_path"))
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    policy.config._name_or_path = str(tmp_path / "would-be-reloaded")
    for precompute in (False, True):
        trainer = SoLoPOTrainer(
            model=policy,
            args=common.config(
                tmp_path, solopo_loss_type=loss_type, precompute_ref_log_probs=precompute
            ),
            train_dataset=common.dataset(),
            processing_class=tok,
        )
        assert trainer.ref_model is None
        assert not trainer.precompute_ref_logps
        assert trainer.args.precompute_ref_log_probs is precompute  # the user's args untouched
        trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1]))
    # Only the stand-in (one element) is ever hashed, never the policy.
    assert all(sum(p.numel() for p in module.parameters()) == 1 for module in hashed), hashed


def test_the_reference_free_stand_in_is_prepared_by_fsdp2_at_no_cost(tmp_path):
    # What DPOTrainer does with it under FSDP2 (prepare_fsdp: fully_shard on the root); DeepSpeed
    # ZeRO-3 prepares it in test_zero3.py (simpo).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from solopo_kernels.integrations.trl import _NoReference

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        stand_in = _NoReference(common.model_pair(common.tokenizer())[0].config)
        fully_shard(stand_in, mesh=init_device_mesh("cpu", (1,)))
        assert sum(p.numel() for p in stand_in.parameters()) == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ra_target", ["chosen", "both"])
def test_precomputed_reference_gives_the_same_loss(tmp_path, ra_target):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    shared = dict(tok=tok, solopo_ra_target=ra_target)
    live = common.trainer(
        tmp_path / "live", policy=copy.deepcopy(policy), ref=copy.deepcopy(ref), **shared
    )
    pre = common.trainer(
        tmp_path / "pre",
        policy=copy.deepcopy(policy),
        ref=copy.deepcopy(ref),
        precompute_ref_log_probs=True,
        **shared,
    )
    columns = set(pre.train_dataset.column_names)
    assert {"ref_chosen_logps", "ref_rejected_logps", "ref_long_chosen_logps"} <= columns
    assert ("ref_long_rejected_logps" in columns) == (ra_target == "both")
    batch = common.batch(pre, [0, 1, 2, 3])
    assert "ref_long_chosen_logps" in batch
    expected = live.compute_loss(live.model, common.batch(live, [0, 1, 2, 3]))
    got = pre.compute_loss(pre.model, batch)
    reference.assert_close_rel(
        got.detach(), expected.detach(), 1e-6, "precomputed vs live reference"
    )


def test_precompute_without_reference_model_uses_the_initial_policy(tmp_path):
    # Full fine-tuning, no ref_model: the policy before training is the reference (TRL semantics),
    # so the rewards at step 0 are exactly zero.
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    trainer = common.trainer(
        tmp_path, tok=tok, policy=policy, ref=None, precompute_ref_log_probs=True
    )
    assert trainer.ref_model is None
    loss = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1, 2, 3]))
    assert abs(loss.item() - math.log(2.0)) < 1e-6
    # The precomputed (no-grad) and the training forward tile the head differently: equal up to
    # float32 rounding, not bit for bit.
    (distance,) = trainer._metrics["train"]["solo_ra/distance"]
    assert abs(distance) < 1e-6


def test_peft_adapter_disabled_is_the_reference(tmp_path):
    peft = pytest.importorskip("peft")
    from solopo_kernels.integrations.trl import SoLoPOTrainer

    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    trainer = SoLoPOTrainer(
        model=policy,
        args=common.config(tmp_path, max_steps=4, learning_rate=2e-2),
        train_dataset=common.dataset(),
        processing_class=tok,
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    # A fresh LoRA adapter is zero: policy == base model == reference, so the DPO loss is log 2.
    loss = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1]))
    assert abs(loss.item() - math.log(2.0)) < 1e-6
    head_before = policy.lm_head.weight.detach().clone()
    trainer.train()
    # The adapter learned a preference against the frozen base (the reference) ...
    assert trainer.state.log_history[-2]["rewards/margins"] > 0
    # ... and the base weights, which the reference forward reads, did not move.
    assert torch.equal(trainer.model.get_base_model().lm_head.weight, head_before)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # The loss is a per-batch mean (like DPOTrainer); Trainer divides it by the accumulation
    # steps, so 2 x 2 pairs accumulated equal 4 pairs at once. Plain SGD makes the update the
    # gradient itself.
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    params = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        trainer = common.trainer(
            tmp_path / str(batch_size),
            tok=tok,
            policy=copy.deepcopy(policy),
            ref=copy.deepcopy(ref),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,  # no clipping
        )
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    start = torch.cat([p.detach().flatten() for p in policy.parameters()])
    assert (params[0] - start).abs().max() > 1e-3  # the step moved the weights
    reference.assert_close_rel(params[1] - start, params[0] - start, 1e-5, "accumulated update")


def test_in_memory_model_without_ref_model_gets_a_frozen_copy(tmp_path, caplog):
    # A model built in memory has no path TRL could reload a reference from (it used to die with
    # an opaque hub error): its frozen copy is the reference, and the log says so.
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    assert policy.config._name_or_path == ""
    with caplog.at_level("WARNING", logger="solopo_kernels.integrations.trl"):
        trainer = SoLoPOTrainer(
            model=policy,
            args=common.config(tmp_path, max_steps=3, learning_rate=2e-2),
            train_dataset=common.dataset(),
            processing_class=tok,
        )
    assert "using a frozen copy of the policy" in caplog.text
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert not any(p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    # Policy == reference at step 0: every reward is 0 and the DPO loss is log 2.
    loss = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1]))
    assert abs(loss.item() - math.log(2.0)) < 1e-6
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert trainer.state.log_history[-2]["rewards/margins"] != 0.0


def test_in_memory_model_under_zero3_without_ref_model_names_ref_model(tmp_path, monkeypatch):
    import transformers.integrations.deepspeed as ds

    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    with pytest.raises(ValueError, match="ref_model: required"):
        SoLoPOTrainer(
            model=policy,
            args=common.config(tmp_path),
            train_dataset=common.dataset(),
            processing_class=tok,
        )


@pytest.mark.parametrize("where", ["target_modules", "modules_to_save"])
def test_an_adapter_on_lm_head_is_refused(tmp_path, where):
    peft = pytest.importorskip("peft")
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    modules = {"target_modules": ["q_proj", "lm_head"]} if where == "target_modules" else {
        "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]
    }  # fmt: skip
    # TRL 1.16 refuses a LoRA target lm_head itself; TRL 1.14.1 and modules_to_save reach ours.
    with pytest.raises(
        ValueError, match="(peft_config: an adapter on lm_head|PEFT adapter to .lm_head.)"
    ):
        SoLoPOTrainer(
            model=policy,
            args=common.config(tmp_path, solopo_loss_type="simpo"),
            train_dataset=common.dataset(),
            processing_class=tok,
            peft_config=peft.LoraConfig(r=4, **modules),
        )


def test_peft_under_zero3_with_checkpointing_needs_one_forward_per_step(tmp_path, monkeypatch):
    # TRL forces reentrant checkpointing for PEFT under ZeRO-3, which breaks two policy forwards.
    peft = pytest.importorskip("peft")
    import transformers.integrations.deepspeed as ds

    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    tok = common.tokenizer()
    policy, _ = common.model_pair(tok)
    with pytest.raises(
        ValueError, match="gradient_checkpointing: with PEFT under DeepSpeed ZeRO-3"
    ):
        SoLoPOTrainer(
            model=policy,
            args=common.config(tmp_path, solopo_loss_type="simpo", gradient_checkpointing=True),
            train_dataset=common.dataset(),
            processing_class=tok,
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]),
        )


@pytest.mark.parametrize("fsdp_version", [1, 2])
def test_reference_free_types_load_no_reference_under_fsdp(tmp_path, monkeypatch, fsdp_version):
    """DPOTrainer's __init__ as it runs under FSDP (accelerate enables FSDP on GPUs only, so its
    FSDP state is put in place here): given no reference it would load one from the model's path.
    The policy alone is loaded, the stand-in is what gets prepared, and under FSDP1 the auto-wrap
    policy it is prepared with already wraps the policy's decoder layers."""
    import transformers
    import trl.trainer.dpo_trainer as dpo_module
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    tok = common.tokenizer()
    path = str(tmp_path / "policy")
    common.model_pair(tok)[0].save_pretrained(path)
    tok.save_pretrained(path)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp_version,
        auto_wrap_policy="transformer_based_wrap",
        sync_module_states=False,
        cpu_ram_efficient_loading=False,
    )
    original = transformers.Trainer.create_accelerator_and_postprocess

    def with_fsdp(self):
        original(self)
        self.accelerator.state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True

    loads, prepared = [], []
    load = dpo_module.create_model_from_path

    def counting_load(model_id, **kwargs):
        loads.append(model_id)
        return load(model_id, **kwargs)

    def recording_prepare(model, accelerator):
        policy = accelerator.state.fsdp_plugin.auto_wrap_policy
        if fsdp_version == 1:  # what prepare_fsdp does first under FSDP1
            accelerator.state.fsdp_plugin.set_auto_wrap_policy(model)
            policy = accelerator.state.fsdp_plugin.auto_wrap_policy
        prepared.append((model, policy))
        return model

    monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess", with_fsdp)
    monkeypatch.setattr(dpo_module, "create_model_from_path", counting_load)
    monkeypatch.setattr(dpo_module, "prepare_fsdp", recording_prepare)
    trainer = SoLoPOTrainer(
        model=path,
        args=common.config(tmp_path / "out", solopo_loss_type="simpo"),
        train_dataset=common.dataset(),
        processing_class=tok,
    )
    assert loads == [path]  # the policy, and no reference
    assert trainer.ref_model is None
    ((stand_in, policy),) = prepared
    assert sum(p.numel() for p in stand_in.parameters()) == 1
    if fsdp_version == 1:
        assert policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}
        layer = trainer.model.model.layers[0]
        assert policy(module=layer, recurse=False, nonwrapped_numel=1)


def test_precompute_under_deepspeed_is_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    args = common.config(tmp_path, precompute_ref_log_probs=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets
    with pytest.raises(
        ValueError, match=r"precompute_ref_log_probs: not supported under DeepSpeed .*=False"
    ):
        SoLoPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=common.dataset(),
            processing_class=tok,
        )
