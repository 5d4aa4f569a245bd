"""Context builder: lengths, verbatim passages, depths, rho, multi-scale, determinism, errors."""

from __future__ import annotations

import math

import pytest

from solopo_kernels.data.contexts import (
    TEMPLATES,
    ContextBuilder,
    DistractorPool,
    TargetLengths,
    build_contexts,
    format_summary,
    parse_length,
    prompt_text,
    summarize_lengths,
)
from solopo_kernels.data.judge import normalize_answer
from solopo_kernels.data.readers import Passage, QAExample

LENGTHS = TargetLengths.parse("1k,2k,4k")


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def content(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[0]["content"]


@pytest.fixture(scope="module")
def chat_rows(examples, tiny_tok):
    return build_contexts(examples, tiny_tok, LENGTHS, progress=False)


@pytest.fixture(scope="module")
def bpe_rows(examples, bpe_tok):
    lengths = TargetLengths.parse(length_range="900:3500")
    return build_contexts(
        examples,
        bpe_tok,
        lengths,
        prompt_format="standard",
        template=TEMPLATES["qa"],
        progress=False,
    )


@pytest.mark.parametrize(
    "rows_name, tok_name", [("chat_rows", "tiny_tok"), ("bpe_rows", "bpe_tok")]
)
def test_lengths_within_tolerance_and_rho(request, rows_name, tok_name):
    rows, tokenizer = request.getfixturevalue(rows_name), request.getfixturevalue(tok_name)
    for row in rows:
        meta = row["metadata"]
        target = meta["target_length"]
        long_length = count(tokenizer, prompt_text(tokenizer, row["long_prompt"]))
        short_length = count(tokenizer, prompt_text(tokenizer, row["prompt"]))
        assert (meta["long_length"], meta["short_length"]) == (long_length, short_length)
        assert target - max(1, math.floor(0.01 * target)) <= long_length <= target, row["id"]
        assert meta["rho"] == short_length / long_length
        assert meta["num_distractors"] > 0


@pytest.mark.parametrize("rows_name", ["chat_rows", "bpe_rows"])
def test_relevant_passages_verbatim_once_in_both_prompts(request, examples, rows_name):
    rows = request.getfixturevalue(rows_name)
    for example, row in zip(examples, rows, strict=True):
        short, long = content(row["prompt"]), content(row["long_prompt"])
        positions = []
        for passage in example.passages:
            assert short.count(passage.text) == 1 and long.count(passage.text) == 1
            assert short.count(passage.render()) == 1 and long.count(passage.render()) == 1
            positions.append(long.index(passage.render()))
        assert positions == sorted(positions)  # passage order is kept


def test_short_and_long_share_instruction_and_question(chat_rows, bpe_rows, examples, tiny_tok):
    for rows in (chat_rows, bpe_rows):
        for example, row in zip(examples, rows, strict=True):
            short, long = content(row["prompt"]), content(row["long_prompt"])
            last = example.passages[-1].render()
            # Everything after the last relevant passage in the short prompt ends the long one.
            tail = short[short.index(last) + len(last) :]
            assert example.question in tail and long.endswith(tail)
            assert short.split("\n\n")[0] == long.split("\n\n")[0]  # same header
    row = bpe_rows[0]
    assert row["prompt"].endswith("Answer:") and row["long_prompt"].endswith("Answer:")
    rendered = prompt_text(tiny_tok, chat_rows[0]["long_prompt"])
    assert rendered.endswith("<|assistant|> ")  # generation prompt of the chat template


def test_distractors_are_pool_passages_without_the_answer(chat_rows, examples):
    pool = DistractorPool(examples)
    by_text = {passage.text: passage for passage in pool.passages}
    for example, row in zip(examples, chat_rows, strict=True):
        long = content(row["long_prompt"])
        relevant = {p.render() for p in example.passages}
        body = long.split("\n\n")[2:-2]  # between the header lines and the footer lines
        blocks = [block for block in body if block not in relevant]
        assert len(blocks) == row["metadata"]["num_distractors"]
        for block in blocks:
            title, _, text = block.partition("\n")
            whole = by_text.get(text)
            # a distractor is a pool passage, or (the one cut to fit) a prefix of one
            assert whole is not None or any(p.render().startswith(block) for p in pool.passages)
            padded = f" {normalize_answer(block)} "
            assert not any(f" {normalize_answer(a)} " in padded for a in example.answers)


def test_depths_match_token_positions(chat_rows, examples, tiny_tok):
    first_depths = set()
    for example, row in zip(examples, chat_rows, strict=True):
        rendered = prompt_text(tiny_tok, row["long_prompt"])
        length = row["metadata"]["long_length"]
        depths = row["metadata"]["depths"]
        assert len(depths) == len(example.passages)
        for passage, depth in zip(example.passages, depths, strict=True):
            start = count(tiny_tok, rendered[: rendered.index(passage.render())])
            assert abs(depth - start / length) <= 5e-5 + 1e-12  # rounded to 4 decimals
        assert depths == sorted(depths) and 0 <= depths[0] and depths[-1] < 1
        first_depths.add(depths[0])
    assert len(first_depths) > len(examples) // 2  # random depths, not a fixed position


def test_multi_scale_targets(chat_rows, bpe_rows):
    used = {row["metadata"]["target_length"] for row in chat_rows}
    assert used == {1024, 2048, 4096}
    targets = [row["metadata"]["target_length"] for row in bpe_rows]
    assert all(900 <= target <= 3500 for target in targets) and len(set(targets)) > 10

    summary = summarize_lengths(chat_rows)
    assert [group["target"] for group in summary] == [1024, 2048, 4096]
    assert sum(group["count"] for group in summary) == len(chat_rows)
    for group in summary:
        assert group["long_min"] <= group["long_mean"] <= group["long_max"] <= group["target"]
    binned = summarize_lengths(bpe_rows, bins=3)
    assert len(binned) <= 3 and sum(group["count"] for group in binned) == len(bpe_rows)
    assert "rho mean" in format_summary(binned)


def test_same_seed_same_output_independent_of_order(examples, tiny_tok, chat_rows):
    again = build_contexts(examples, tiny_tok, LENGTHS, progress=False)
    assert again == chat_rows
    reversed_rows = build_contexts(examples[::-1], tiny_tok, LENGTHS, progress=False)
    assert reversed_rows[::-1] == chat_rows
    other_seed = build_contexts(examples, tiny_tok, LENGTHS, seed=1, progress=False)
    assert [row["long_prompt"] for row in other_seed] != [row["long_prompt"] for row in chat_rows]


def test_own_distractors_first(examples, tiny_tok):
    example = examples[0]
    builder = ContextBuilder(tiny_tok, DistractorPool(examples), own_distractors="first")
    long = content(builder.build(example, TargetLengths(choices=(2048,)))["long_prompt"])
    assert all(passage.render() in long for passage in example.distractors)


def generic(example_id, answer, passages, distractors=()):
    return QAExample(
        example_id,
        f"Question {example_id}?",
        (answer,),
        tuple(Passage("", text) for text in passages),
        tuple(Passage("", text) for text in distractors),
    )


def test_pool_exclusions(tiny_tok):
    same_answer = generic("b", "Paris", ["The city of lights is the capital."])
    other_answer = generic("c", "Rome", ["The Tiber flows through the old city."])
    mentions = generic("d", "Oslo", ["Paris has many museums."])  # contains a's answer
    filler = [f"Filler passage number {i} about {{braces}} and stones." for i in range(40)]
    target = generic("a", "Paris", ["France has a capital."], filler)
    examples = [target, same_answer, other_answer, mentions]
    tokenizer = tiny_tok
    builder = ContextBuilder(tokenizer, DistractorPool(examples), tolerance=0.05)
    pool = builder.pool
    keys = frozenset({"paris"})
    usable = {pool.passages[i].text for i in range(len(pool)) if pool.usable(i, target, keys)}
    assert "The city of lights is the capital." not in usable  # relevant to the same answer
    assert "Paris has many museums." not in usable  # contains the answer
    assert "France has a capital." not in usable  # its own relevant passage
    assert "The Tiber flows through the old city." in usable  # relevant to another answer
    row = builder.build(target, TargetLengths(choices=(400,)))
    assert "{braces}" in content(row["long_prompt"])  # braces in passages are left alone


def test_bad_targets_and_pools_name_the_example(tiny_tok):
    lonely = generic("lonely", "Paris", ["Paris is the capital of France."])
    with pytest.raises(ValueError, match=r"example 'lonely': no usable distractor in a pool of 1"):
        ContextBuilder(tiny_tok, DistractorPool([lonely])).build(
            lonely, TargetLengths(choices=(500,))
        )

    few = generic("few", "Paris", ["Paris is the capital of France."], ["Owls hunt at night."] * 3)
    builder = ContextBuilder(tiny_tok, DistractorPool([few]))
    with pytest.raises(
        ValueError,
        match=r"example 'few': target length 20 tokens is not longer than the short prompt \(\d+ tokens\)",
    ):
        builder.build(few, TargetLengths(choices=(20,)))
    with pytest.raises(
        ValueError, match=r"example 'few': the distractor pool ran out at \d+ tokens \(target 5000"
    ):
        builder.build(few, TargetLengths(choices=(5000,)))

    with pytest.raises(ValueError, match="chat_template"):
        ContextBuilder(_NoChat(tiny_tok), DistractorPool([few]), prompt_format="conversational")
    with pytest.raises(ValueError, match="tolerance"):
        ContextBuilder(tiny_tok, DistractorPool([few]), tolerance=0)


class _NoChat:
    """A tokenizer proxy without a chat template."""

    is_fast = True
    chat_template = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_target_length_parsing():
    assert parse_length("4k") == 4096 and parse_length("8K") == 8192 and parse_length("100") == 100
    assert TargetLengths.parse("1k, 2k").choices == (1024, 2048)
    assert TargetLengths.parse(length_range="1k:3000").range == (1024, 3000)
    for bad in ("abc", "0", "-5k"):
        with pytest.raises(ValueError):
            parse_length(bad)
    with pytest.raises(ValueError):
        TargetLengths.parse("1k", "1k:2k")
    with pytest.raises(ValueError):
        TargetLengths.parse(length_range="3000:1000")
    with pytest.raises(ValueError):
        TargetLengths.parse(length_range="3000")
