"""Greedy decoding and the package's sub-EM judge over the short and long prompts of a split.

A question is answered correctly when the default judge of ``solopo-data``
(:func:`solopo_kernels.data.judge.make_sub_em_judge`: the gold answer, as whole words, after the
last "answer is") accepts the greedy response. The same judge picks the training pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from solopo_kernels.data.contexts import prompt_text
from solopo_kernels.data.judge import make_sub_em_judge


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End of sequence and end of turn: a chat response ends with either."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


@torch.no_grad()
def greedy_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy responses to ``prompts`` (strings or chat messages), in input order.

    Prompts are sorted by length and left-padded in batches of ``batch_size``; the response is
    decoded up to the first stop token, special tokens skipped.
    """
    was_training = model.training
    model.eval()
    ids = [
        tokenizer(prompt_text(tokenizer, p), add_special_tokens=isinstance(p, str))["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    stops = stop_token_ids(tokenizer)
    responses: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            attention_mask[row, width - len(ids[i]) :] = 1
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(batch):
            tokens = output[row, width:].tolist()
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            responses[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    model.train(was_training)
    return responses


def evaluate_contexts(
    model: Any,
    tokenizer: Any,
    contexts: dict[str, list[dict[str, Any]]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """Accuracy of greedy answers at the short prompt and at each long length.

    ``contexts`` maps a long length (as a string) to the ``build-contexts`` rows of one split at
    that length; every file holds the same questions with the same short prompt. Returns
    ``accuracy`` (``"short"`` and each length -> fraction correct), ``correct`` (the same keys ->
    a string of one ``0``/``1`` per question, in file order, for paired comparisons) and
    ``questions``.
    """
    judge = make_sub_em_judge()
    first = next(iter(contexts.values()))
    columns = {"short": [(row["prompt"], row["answers"]) for row in first]}
    for length, rows in contexts.items():
        if [row["id"] for row in rows] != [row["id"] for row in first]:
            raise ValueError(f"contexts[{length!r}]: not the same questions as the others")
        columns[length] = [(row["long_prompt"], row["answers"]) for row in rows]
    correct: dict[str, list[int]] = {}
    for key, items in columns.items():
        responses = greedy_responses(
            model,
            tokenizer,
            [prompt for prompt, _ in items],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        correct[key] = [
            int(judge(text, answers)) for text, (_, answers) in zip(responses, items, strict=True)
        ]
    return {
        "accuracy": {key: sum(values) / len(values) for key, values in correct.items()},
        "correct": {key: "".join(map(str, values)) for key, values in correct.items()},
        "questions": len(first),
    }
