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


# A ChatML template (the shape of Qwen's, SmolLM2's, ...): BOS, a system turn, the user turn, the
# generation prompt; the tiny word-level tokenizer drops the newlines, the tokens stay.
CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = "a note says the answer is in the box ."  # words of the tiny vocabulary
# (short context, long context, question, chosen, rejected): the long context is the short one
# with distractor sentences around it.
CHAT_ROWS = [
    (
        "the red key is in the box .",
        "the dog ran far away . the old cat sat on the mat . the red key is in the box . "
        "the blue cup is on the shelf . a note says the green bag is under the door .",
        "where is the red key ?",
        "in the box",
        "on the mat",
    ),
    (
        "the blue cup is on the shelf .",
        "the green bag is under the door . the blue cup is on the shelf . the dog ran in the park .",
        "where is the blue cup ?",
        "on the shelf",
        "in the garden",
    ),
]


def _chat_dataset(rows=CHAT_ROWS):
    from datasets import Dataset

    def user(context, question):
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{context} {question}"},
        ]

    return Dataset.from_list(
        [
            {
                "prompt": user(short, question),
                "long_prompt": user(long, question),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            for short, long, question, chosen, rejected in rows
        ]
    )


def _chatml_tokenizer():
    tok = common.tiny_tokenizer([*common.WORDS, "system", "user", "assistant"])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def _chat_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _assert_cut_keeps_the_template(tok, prompt, messages, long_context, short_context, limit, n):
    """The cut prompt is the full one with tokens of the long context removed: everything before
    the context (BOS, system turn, user header) and after it (question, end of turn, generation
    prompt) is there, and so is the short prompt's context; the row is exactly ``limit`` long."""
    full = _chat_ids(tok, messages)
    context = tok(text=long_context, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(context)] == context)
    end = start + len(context)
    assert len(prompt) + n == limit < len(full) + n
    assert prompt[:start] == full[:start], "the template's start must stay"
    assert prompt[len(prompt) - (len(full) - end) :] == full[end:], "the question must stay"
    kept = tok(text=short_context.rstrip(" ."), add_special_tokens=False)["input_ids"]
    assert any(prompt[i : i + len(kept)] == kept for i in range(len(prompt))), "relevant context"
    removed = len(full) - len(prompt)
    middle = prompt[start : len(prompt) - (len(full) - end)]
    assert len(middle) == len(context) - removed  # only context tokens were removed


def test_max_long_length_removes_context_tokens_and_keeps_the_chat_template(tmp_path):
    tok = _chatml_tokenizer()
    policy, ref = common.model_pair(tok)
    limit = 40
    trainer = common.trainer(
        tmp_path, tok=tok, policy=policy, ref=ref, data=_chat_dataset(), max_long_length=limit
    )
    batch = common.batch(trainer, [0, 1])
    short = _short_responses(batch)
    for row, (prompt, response) in enumerate(_long_rows(batch)):
        assert response == short[row]
        example = trainer.train_dataset[row]
        _assert_cut_keeps_the_template(
            tok,
            prompt,
            example["long_prompt"],
            CHAT_ROWS[row][1],
            CHAT_ROWS[row][0],
            limit,
            len(response),
        )
    # The first row's relevant sentence sits after two distractors: those go first.
    first_prompt = _long_rows(batch)[0][0]
    assert tok.convert_tokens_to_ids("dog") not in first_prompt
    assert tok.convert_tokens_to_ids("cat") not in first_prompt


def test_a_long_row_whose_fixed_parts_do_not_fit_raises_naming_the_example(tmp_path):
    tok = _chatml_tokenizer()
    policy, ref = common.model_pair(tok)
    # 2 examples; the limit fits the template, the question and the response of neither.
    trainer = common.trainer(
        tmp_path, tok=tok, policy=policy, ref=ref, data=_chat_dataset(), max_long_length=24
    )
    with pytest.raises(
        ValueError,
        match=r"max_long_length=24: example 1's long prompt keeps \d+ tokens before its context "
        r"\(the template's start: BOS, system prompt, user header\) and \d+ after it \(the "
        r"question and the generation prompt\), and the short prompt's context of \d+ tokens; "
        r"with its chosen response of \d+ tokens",
    ):
        common.batch(trainer, [1])


def test_max_long_length_with_smollm2s_chat_template(tmp_path):
    """The real template (SmolLM2-135M-Instruct's tokenizer; a tiny random model of its
    vocabulary): a system prompt, passages, the question."""
    from transformers import AutoTokenizer

    from tests.pretrained_models import folder_or_skip

    tok = AutoTokenizer.from_pretrained(folder_or_skip("smollm2-135m-instruct"))
    passages = [
        "Marie Dubois was born in Lyon and works for a bakery in Paris.",
        "Jonas Berg lives in Oslo. He trained as a pilot and married Anna Holm.",
        "The river Aare flows through Bern and joins the Rhine at Koblenz.",
        "Lena Park was born in Busan. She works for a shipping company in Seoul.",
    ]
    question = "Question: Where was Jonas Berg born? If the passages do not say, answer unknown."
    rows = [("\n\n".join(passages[1:2]), "\n\n".join(passages), question, "Unknown.", "Oslo.")]

    def messages(context):
        return [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Passages:\n\n{context}\n\n{question}"},
        ]

    from datasets import Dataset

    data = Dataset.from_list(
        [
            {
                "prompt": messages(short),
                "long_prompt": messages(long),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            for short, long, _, chosen, rejected in rows
        ]
    )
    trainer = common.trainer(
        tmp_path, tok=tok, policy=tiny_llama(tok), ref=None, solopo_loss_type="simpo", data=data
    )
    (full, response), *_ = _long_rows(common.batch(trainer, [0]))
    assert full == _chat_ids(tok, messages(rows[0][1]))
    limit = len(full) + len(response) - 20  # 20 tokens too many
    trainer.data_collator.max_long_length = limit
    (prompt, response), *_ = _long_rows(common.batch(trainer, [0]))
    assert len(prompt) + len(response) == limit
    text = tok.decode(prompt)
    head = tok.apply_chat_template(messages(""), add_generation_prompt=True, tokenize=False)
    assert text.startswith(head.split("Passages:")[0] + "Passages:\n\n"), text[:200]
    assert text.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n"), text[-200:]
    assert passages[1] in text  # the short prompt's passage
    assert passages[0] not in text  # the first tokens of the context went first
    assert passages[2] in text  # a window around it: the end of the context went next


def test_the_layout_and_the_cut_on_token_lists():
    from solopo_kernels.integrations.trl_data import cut_long_prompt, long_prompt_layout

    # head 1 2 | context | question 8 9; the short context (5 6) lies inside the long one.
    short = [1, 2, 5, 6, 8, 9]
    long = [1, 2, 30, 31, 32, 5, 6, 40, 41, 8, 9]
    layout = long_prompt_layout(short, long, index=7)
    assert layout == {"index": 7, "prefix": 2, "suffix": 2, "keep_start": 5, "keep_end": 7}
    assert cut_long_prompt(long, layout, 11, "r", 20) == long
    assert cut_long_prompt(long, layout, 9, "r", 20) == [1, 2, 32, 5, 6, 40, 41, 8, 9]
    assert cut_long_prompt(long, layout, 6, "r", 20) == [1, 2, 5, 6, 8, 9]
    with pytest.raises(ValueError, match=r"max_long_length=20: example 7's long prompt keeps 2 "):
        cut_long_prompt(long, layout, 5, "chosen response", 20)
    # The short context is not in the long one in one piece: only the ends are fixed, and the
    # context loses its first tokens.
    layout = long_prompt_layout([1, 2, 5, 7, 6, 8, 9], long, index=0)
    assert (layout["keep_start"], layout["keep_end"]) == (9, 9)
    assert cut_long_prompt(long, layout, 6, "r", 20) == [1, 2, 40, 41, 8, 9]


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
