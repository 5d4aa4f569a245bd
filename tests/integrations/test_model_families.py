"""SoLoPOTrainer across model families: the first step's loss equals the objective computed from
the model's own logits (its HF forward, float64 log-softmax), and heads the kernel cannot compute
are refused while the trainer is built, before any tokenization.

Each family is a tiny random config (2 layers, hidden 32). The head weights are scaled up so that
the model's own logits have a standard deviation of about 8: a logit scale dropped or applied in
the wrong direction (Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``)
changes the loss by far more than the tolerance (1e-5 relative, float32 kernel against float64).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations.model_patch import head_temperature  # noqa: E402
from solopo_kernels.integrations.trl import SoLoPOTrainer  # noqa: E402
from tests import reference  # noqa: E402
from tests.integrations import common  # noqa: E402

# model_type -> config overrides (on top of the tiny sizes below)
FAMILIES = {
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "mistral": ("mistral", {}),
    "phi3": ("phi3", {}),
    "gemma3-text": ("gemma3_text", {"head_dim": 8, "sliding_window": 64}),
    "cohere": ("cohere", {"logit_scale": 0.0625}),  # logits * 0.0625
    "granite": ("granite", {"logits_scaling": 8.0}),  # logits / 8
}
OPTIONS = {"loss_type": "simpo", "beta": 2.0, "alpha": 1.0, "gamma": 0.5}
LOGIT_STD = 8.0


def family_model(model_type: str, tok, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([tok(text=common.ROWS[0][1])["input_ids"]])
    with torch.no_grad():
        std = model(input_ids=ids).logits.std()
        model.get_output_embeddings().weight.mul_(LOGIT_STD / std)  # the shared one when tied
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_first_step_loss_equals_the_objective_from_the_models_own_logits(tmp_path, family):
    model_type, overrides = FAMILIES[family]
    tok = common.tokenizer()
    model = family_model(model_type, tok, **overrides)
    model64 = copy.deepcopy(model).double()
    trainer = SoLoPOTrainer(
        model=model,
        args=common.config(
            tmp_path,
            solopo_loss_type=OPTIONS["loss_type"],
            beta=OPTIONS["beta"],
            solopo_alpha=OPTIONS["alpha"],
            gamma=OPTIONS["gamma"],
        ),
        train_dataset=common.dataset(),
        processing_class=tok,
    )
    model.train()
    loss = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1, 2, 3]))
    with torch.no_grad():
        expected = common.reference_loss(model64, None, tok, common.ROWS, **OPTIONS)
    reference.assert_close_rel(loss.detach(), expected, 1e-5, f"{family} first-step loss")


def test_soft_capping_is_refused_before_tokenization_naming_the_option(tmp_path, monkeypatch):
    tok = common.tokenizer()
    model = family_model("gemma2", tok, head_dim=8)
    assert model.config.final_logit_softcapping == 30.0

    def tokenize(*args, **kwargs):
        raise AssertionError("the dataset was tokenized before the head was checked")

    monkeypatch.setattr(SoLoPOTrainer, "_prepare_dataset", tokenize)
    with pytest.raises(ValueError, match=r"Gemma2Config.final_logit_softcapping=30.0: .*soft-caps"):
        SoLoPOTrainer(
            model=model,
            args=common.config(tmp_path, solopo_loss_type="simpo"),
            train_dataset=common.dataset(),
            processing_class=tok,
        )


def _config(model_type: str, **values):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **values)


def test_the_logit_scale_becomes_the_kernel_temperature_in_each_familys_direction():
    assert head_temperature(_config("llama")) == 1.0
    assert head_temperature(_config("cohere", logit_scale=0.25)) == 4.0  # logits * 0.25
    assert head_temperature(_config("granite", logits_scaling=4.0)) == 4.0  # logits / 4
    assert head_temperature(_config("hyperclovax", logits_scaling=4.0)) == 0.25  # logits * 4


def test_an_unknown_family_with_a_scale_is_refused_naming_the_attribute():
    config = _config("llama")
    config.logits_scaling = 2.0  # direction unknown for llama
    with pytest.raises(ValueError, match=r"LlamaConfig.logits_scaling=2.0: .*model_type='llama'"):
        head_temperature(config)
    config.logits_scaling = 1.0  # a neutral value is fine
    assert head_temperature(config) == 1.0
