"""The MoE router load-balancing loss in the trainer: added as TRL's DPOTrainer adds it, pooled
over every policy token of the step (short and long rows, padded or packed), and equal to the
model's own ``aux_loss`` over those tokens."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations import moe  # noqa: E402
from tests import reference  # noqa: E402
from tests.integrations import common  # noqa: E402

FAMILIES = ("qwen3_moe", "mixtral")
COEF = 0.5


def moe_model(model_type: str, tok, *, seed: int = 0, **overrides):
    """A tiny random MoE causal LM: 2 layers, 4 experts, 2 per token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def _own_aux_loss(model, sequences: list[list[int]]) -> float:
    """The model's own ``aux_loss`` (its forward with ``output_router_logits=True``) over all
    ``sequences`` in one right-padded batch: the load-balancing loss of every real token."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss.item()


def _step_sequences(tok, with_long: bool) -> list[list[int]]:
    rows = common.ROWS
    short = [common._text_rows(tok, r[0], r[2])[0] for r in rows]
    short += [common._text_rows(tok, r[0], r[3])[0] for r in rows]
    long = [common._text_rows(tok, r[1], r[2])[0] for r in rows] if with_long else []
    return short + long


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logged_loss_and_aux_loss_equal_the_models_own_over_the_steps_tokens(
    tmp_path, family, padding_free
):
    tok = common.tokenizer()
    policy = moe_model(family, tok)
    ref = moe_model(family, tok, seed=1)  # a reference that routes differently: it must not count
    expected_aux = _own_aux_loss(policy, _step_sequences(tok, with_long=True))
    # float32: the grouped expert GEMM of these families has no float64 kernel.
    expected = common.reference_loss(
        copy.deepcopy(policy),
        copy.deepcopy(ref),
        tok,
        common.ROWS,
        loss_type="dpo",
        beta=0.5,
        alpha=1.0,
    ).item()
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=policy,
        ref=ref,
        solopo_loss_type="dpo",
        router_aux_loss_coef=COEF,
        padding_free=padding_free,
        per_device_train_batch_size=4,  # the first step is the whole dataset
        max_steps=1,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert abs(logged["aux_loss"] - expected_aux) <= 1e-5 * expected_aux, (logged, expected_aux)
    total = expected + COEF * expected_aux
    assert abs(logged["loss"] - total) <= 1e-5 * total, (logged["loss"], total)


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_loss_and_aux_loss_equal_trl_dpo_trainers(tmp_path, family):
    """With alpha = 0 a SoLoPO dpo step is a DPO step on the same rows: the loss with the
    auxiliary term and the logged aux_loss equal DPOTrainer's."""
    from trl import DPOConfig, DPOTrainer

    tok = common.tokenizer()
    policy, ref = moe_model(family, tok), moe_model(family, tok, seed=1)
    solopo = common.trainer(
        tmp_path,
        tok=tok,
        policy=copy.deepcopy(policy),
        ref=copy.deepcopy(ref),
        solopo_alpha=0.0,
        router_aux_loss_coef=COEF,
        data=common.dataset().remove_columns("long_prompt"),
    )
    settings = {k: v for k, v in common.config(tmp_path).to_dict().items() if k in ("beta",)}
    dpo = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=DPOConfig(
            output_dir=str(tmp_path / "dpo"),
            report_to="none",
            use_cpu=True,
            bf16=False,  # DPOConfig's default is True where bf16 is available (the CPU included)
            router_aux_loss_coef=COEF,
            gradient_checkpointing=False,
            disable_tqdm=True,
            **settings,
        ),
        train_dataset=common.dataset().remove_columns("long_prompt"),
        processing_class=tok,
    )
    losses, aux = [], []
    for trainer in (solopo, dpo):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
        aux.append(trainer._metrics["train"]["aux_loss"][-1])
    reference.assert_close_rel(torch.tensor(losses[0]), torch.tensor(losses[1]), 1e-5, "loss")
    reference.assert_close_rel(torch.tensor(aux[0]), torch.tensor(aux[1]), 1e-5, "aux_loss")
    assert aux[0] > 1.0  # 4 experts, 2 per token: about 2 when balanced


def test_a_zero_coefficient_adds_nothing_and_logs_no_aux_loss(tmp_path):
    tok = common.tokenizer()
    trainer = common.trainer(
        tmp_path,
        tok=tok,
        policy=moe_model("qwen3_moe", tok),
        ref=None,
        solopo_loss_type="simpo",
        router_aux_loss_coef=0.0,
        max_steps=1,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "aux_loss" not in logged
    total = logged["preference_loss"] + logged["alignment_loss"]
    assert abs(logged["loss"] - total) <= 1e-5 * abs(total)


def test_the_coefficient_follows_dpo_trainers_rule():
    from transformers import AutoConfig

    qwen = AutoConfig.for_model("qwen3_moe", router_aux_loss_coef=0.25)
    llama = AutoConfig.for_model("llama")
    args = SimpleNamespace
    assert moe.aux_loss_coefficient(qwen, args(router_aux_loss_coef=None)) == 0.25  # the config's
    assert moe.aux_loss_coefficient(qwen, args(router_aux_loss_coef=0.5)) == 0.5
    assert moe.aux_loss_coefficient(qwen, args(router_aux_loss_coef=0.0)) == 0.0
    assert moe.aux_loss_coefficient(llama, args(router_aux_loss_coef=None)) == 0.0
    with pytest.raises(ValueError, match=r"router_aux_loss_coef: set to 0.5 but LlamaConfig"):
        moe.aux_loss_coefficient(llama, args(router_aux_loss_coef=0.5))


def test_router_sums_of_two_forwards_give_the_loss_of_one_forward_over_both():
    """Pooling: the sums of two forwards added give transformers' loss over their tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    layers_a = tuple(torch.randn(6, 4, generator=gen) for _ in range(3))
    layers_b = tuple(torch.randn(10, 4, generator=gen) for _ in range(3))
    mask_b = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    load = moe.router_load(layers_a, 4, 2, None) + moe.router_load(layers_b, 4, 2, mask_b)
    kept = mask_b.reshape(-1).bool()
    joined = tuple(torch.cat([a, b[kept]]) for a, b in zip(layers_a, layers_b, strict=True))
    expected = load_balancing_loss_func(joined, 4, 2, None)
    torch.testing.assert_close(load.loss(), expected, rtol=1e-6, atol=0)
