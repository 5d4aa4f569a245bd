"""Long-prompt data handling of SoLoPOTrainer: formats, truncation, and the errors it raises
instead of training on a wrong batch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations.model_patch import patch_solopo_forward  # noqa: E402
from solopo_kernels.integrations.trl import DataCollatorForSoLoPO, SoLoPOConfig  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama  # noqa: E402
from tests.integrations import common  # noqa: E402


def _long_rows(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each long row, read back from the padded batch."""
    rows = []
    for ids, attn, mask in zip(
        batch["long_input_ids"],
        batch["long_attention_mask"],
        batch["long_completion_mask"],
        strict=True,
    ):
        ids, mask = ids[attn.bool()].tolist(), mask[attn.bool()].tolist()
        start = mask.index(1)
        assert all(mask[start:]), "the response must be one contiguous block at the end of the row"
        rows.append((ids[:start], ids[start:]))
    return rows


def _short_responses(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [
        ids[m.bool()].tolist()
        for ids, m in zip(batch["input_ids"], batch["completion_mask"], strict=True)
    ]


def test_long_rows_are_long_prompt_plus_the_short_response(tmp_path):
    tok = common.tokenizer()
    trainer = common.trainer(tmp_path, tok=tok, solopo_ra_target="both")
    batch = common.batch(trainer, [0, 1, 2])
    assert batch["long_input_ids"].shape[0] == 6  # chosen rows, then rejected rows
    short = _short_responses(batch)
    for row, (prompt, response) in enumerate(_long_rows(batch)):
        example = common.ROWS[row % 3]
        assert prompt == tok(text=example[1])["input_ids"]
        assert response == short[row]  # token-for-token the short side's response
    # The short part is TRL's own DataCollatorForPreference output.
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    plain = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [trainer.train_dataset[i] for i in range(3)]
    )
    for key, value in plain.items():
        assert torch.equal(batch[key], value)


def test_max_long_length_cuts_the_long_prompt_from_the_left(tmp_path):
    tok = common.tokenizer()
    trainer = common.trainer(tmp_path, tok=tok, max_long_length=12)
    batch = common.batch(trainer, [0, 1, 2, 3])
    assert batch["long_attention_mask"].sum(-1).tolist() == [12] * 4
    short = _short_responses(batch)
    for row, (prompt, response) in enumerate(_long_rows(batch)):
        full_prompt = tok(text=common.ROWS[row][1])["input_ids"]
        assert response == short[row]
        assert (
            prompt == full_prompt[len(full_prompt) - len(prompt) :]
        )  # a suffix: the question stays
        assert tok.decode(prompt).endswith("?")


def test_short_side_truncation_is_mirrored_on_the_long_side(tmp_path):
    tok = common.tokenizer()
    # The short prompts have 14 tokens: max_length=16 keeps 2 response tokens (TRL keep_start).
    trainer = common.trainer(tmp_path, tok=tok, max_length=16, solopo_ra_target="both")
    batch = common.batch(trainer, [0, 1, 2, 3])
    short = _short_responses(batch)
    for row, response in enumerate(short):
        example = trainer.train_dataset[row % 4]
        side = "chosen_ids" if row < 4 else "rejected_ids"
        assert len(response) == 16 - len(example["prompt_ids"]) < len(example[side])
    assert [r for _, r in _long_rows(batch)] == short


def test_response_that_leaves_no_room_for_the_long_prompt_raises(tmp_path):
    trainer = common.trainer(tmp_path, max_long_length=4)
    with pytest.raises(ValueError, match="max_long_length=4"):
        common.batch(trainer, [0, 1])


def test_response_truncated_away_on_the_short_side_raises():
    tok = common.tokenizer()
    collator = DataCollatorForSoLoPO(pad_token_id=tok.pad_token_id, max_length=3)
    example = {
        "prompt_ids": [7, 8, 9],
        "chosen_ids": [10, 11],
        "rejected_ids": [12],
        "long_prompt_ids": [5, 7, 8, 9],
    }
    with pytest.raises(ValueError, match="chosen response is truncated away"):
        collator([example])


def test_missing_long_prompt_column_raises(tmp_path):
    with pytest.raises(
        ValueError, match="long_prompt_column: the train dataset has no column 'context_long'"
    ):
        common.trainer(tmp_path, long_prompt_column="context_long")


def test_empty_long_prompt_raises(tmp_path):
    rows = [common.ROWS[0], (common.ROWS[1][0], "  ", *common.ROWS[1][2:])]
    with pytest.raises(ValueError, match="long_prompt: example 1 has an empty long prompt"):
        common.trainer(tmp_path, data=common.dataset(rows))


def test_response_that_tokenizes_differently_after_the_long_prompt_raises(tmp_path):
    # "... in the" + "box" glues into one unknown word on the long side only.
    rows = [
        (
            "where is the red key ? in the ",
            "the dog ran far away . where is the red key ? in the",
            "box",
            "mat",
        )
    ]
    with pytest.raises(ValueError, match="chosen response tokenizes differently"):
        common.trainer(tmp_path, data=common.dataset(rows))


def test_conversational_prompts(tmp_path):
    tok = common.tokenizer()
    rows = [
        {
            "prompt": [{"role": "user", "content": r[0]}],
            "long_prompt": [{"role": "user", "content": r[1]}],
            "chosen": [{"role": "assistant", "content": r[2]}],
            "rejected": [{"role": "assistant", "content": r[3]}],
        }
        for r in common.ROWS
    ]
    from datasets import Dataset

    trainer = common.trainer(tmp_path, tok=tok, data=Dataset.from_list(rows))
    batch = common.batch(trainer, [0, 1])
    short = _short_responses(batch)
    for row, (prompt, response) in enumerate(_long_rows(batch)):
        expected = tok.apply_chat_template(
            rows[row]["long_prompt"], add_generation_prompt=True, tokenize=True
        )
        assert prompt == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert response == short[row]


def test_message_list_long_prompt_beside_a_string_prompt_is_rendered(tmp_path):
    tok = common.tokenizer()
    messages = [[{"role": "user", "content": r[1]}] for r in common.ROWS]
    data = common.dataset().remove_columns("long_prompt").add_column("long_prompt", messages)
    trainer = common.trainer(tmp_path, tok=tok, data=data)
    (prompt, _), *_ = _long_rows(common.batch(trainer, [0]))
    rendered = tok.apply_chat_template(messages[0], add_generation_prompt=True, tokenize=False)
    assert prompt == tok(text=rendered)["input_ids"]


def test_string_long_prompt_beside_a_conversational_prompt_raises(tmp_path):
    from datasets import Dataset

    row = common.ROWS[0]
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row[0]}],
                "long_prompt": row[1],
                "chosen": [{"role": "assistant", "content": row[2]}],
                "rejected": [{"role": "assistant", "content": row[3]}],
            }
        ]
    )
    with pytest.raises(ValueError, match="same conversational format"):
        common.trainer(tmp_path, data=data)


def test_extra_batch_keys_never_reach_the_model(tmp_path):
    trainer = common.trainer(tmp_path)
    seen: list[set[str]] = []
    handles = [
        model.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True
        )
        for model in (trainer.model, trainer.ref_model)
    ]
    try:
        trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1]))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 4  # policy short and long, reference short and long
    assert all({"input_ids", "attention_mask"} <= keys for keys in seen[:2])
    assert not any(
        k.startswith(("long_", "ref_", "solopo", "completion")) or k == "labels"
        for keys in seen
        for k in keys
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"loss_type": "hinge"}, "loss_type: SoLoPO does not implement"),
        ({"solopo_loss_type": "kto"}, "loss_type"),
        ({"solopo_loss_type": "simpo", "sync_ref_model": True}, "sync_ref_model"),
        (
            {
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            "use_reentrant",
        ),
        ({"max_long_length": 1}, "max_long_length"),
        ({"solopo_alpha": -1.0}, "alpha"),
    ],
)
def test_config_rejects_what_it_would_otherwise_ignore(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        common.config(tmp_path, **overrides)


def test_patch_refuses_heads_that_transform_logits():
    model = tiny_llama(common.tokenizer())
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        patch_solopo_forward(model)


def test_solopo_config_is_a_dpo_config():
    from trl import DPOConfig

    assert issubclass(SoLoPOConfig, DPOConfig)
