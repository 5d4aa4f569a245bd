"""The data side of the TRL integration: the collator that adds the long rows (and packs a step
into one row with ``padding_free``), and the tokenization of the long-prompt column.

Kept apart from :mod:`.trl` (the trainer) because it is the part that decides what the model sees:
read it next to TRL's ``DataCollatorForPreference``, whose output it extends.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from ..losses import SoLoPOOptions
from .packing import PACKED_PAIRS, pack_sequences

# Batch keys added by the SoLoPO collator. They carry a prefix so that none of them can collide
# with a model keyword argument, and they are stripped before ``model(**kwargs)``.
LONG_PREFIX = "long_"
REF_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_long_chosen_logps",
    "ref_long_rejected_logps",
)
LONG_PROMPT_IDS = "long_prompt_ids"
# Where a long prompt may be cut (see long_prompt_layout): its dataset index, the tokens before
# and after its context, and the short prompt's context inside it.
LONG_PROMPT_LAYOUT = "long_prompt_layout"
# The padded layout's row tensors (TRL's short rows and this collator's long rows).
SHORT_KEYS = ("input_ids", "attention_mask", "completion_mask")
LONG_KEYS = tuple(LONG_PREFIX + key for key in SHORT_KEYS)


@dataclass
class DataCollatorForSoLoPO(DataCollatorForPreference):
    """``DataCollatorForPreference`` plus the long rows, padded or packed.

    Each example holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL) and
    ``long_prompt_ids``; optionally the ``ref_*_logps`` scalars of :data:`REF_COLUMNS`, which are
    passed through as ``(B,)`` float tensors.

    Padded output (``padding_free=False``): TRL's ``input_ids``/``attention_mask``/
    ``completion_mask`` of shape ``(2B, Ts)`` (chosen rows first), plus ``long_input_ids``/
    ``long_attention_mask``/``long_completion_mask`` of shape ``(B, Tl)`` (``long_rows="chosen"``)
    or ``(2B, Tl)`` (``"both"``, chosen rows first).

    Packed output (``padding_free=True``): the same sequences, unpadded and concatenated in the
    order short chosen, short rejected, long chosen (, long rejected) into
    ``packed_input_ids``/``packed_position_ids``/``packed_completion_mask``/
    ``packed_sequence_ids`` of shape ``(P, L)``: ``P = 1`` row unless ``max_packed_length`` caps
    the tokens per row (see :mod:`.packing`). For example, one pair with short rows of 3 and 4
    tokens and a long row of 6 tokens gives one row of 13 tokens whose ``position_ids`` are
    ``[0 1 2 0 1 2 3 0 1 2 3 4 5]`` and ``sequence_ids`` ``[0 0 0 1 1 1 1 2 2 2 2 2 2]``; the
    batch also says how many pairs it packs (``packed_pairs``, an int).

    A long row is ``long_prompt_ids + r`` where ``r`` is the response exactly as it is kept on the
    short side (after ``max_length`` truncation). With ``max_long_length`` a long row that does not
    fit loses tokens from its context only (:func:`cut_long_prompt`: the template's start and the
    question stay, and so does the short prompt's context); a row whose fixed parts alone do not
    fit, or whose response the short side truncated away entirely, raises ``ValueError`` naming
    the example.
    """

    max_long_length: int | None = None
    long_rows: str = "chosen"
    include_long: bool = True
    padding_free: bool = False
    max_packed_length: int | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.truncation_mode != "keep_start":
            raise ValueError(
                f"truncation_mode: DataCollatorForSoLoPO supports 'keep_start', got {self.truncation_mode!r}"
            )
        output = super().torch_call(examples)
        for name in REF_COLUMNS[2:]:
            if name in examples[0]:
                output[name] = torch.tensor([example[name] for example in examples])
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.include_long:
            kept = output["completion_mask"].sum(-1).tolist()  # response tokens kept per short row
            rows = self._long_rows(examples, kept)
        if self.padding_free:
            return self._packed(output, rows)
        if rows:
            pad_kw = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
            ids, masks = [r[0] for r in rows], [r[1] for r in rows]
            output[LONG_KEYS[0]] = pad(ids, padding_value=self.pad_token_id, **pad_kw)
            output[LONG_KEYS[1]] = pad([torch.ones_like(r) for r in ids], padding_value=0, **pad_kw)
            output[LONG_KEYS[2]] = pad(masks, padding_value=0, **pad_kw)
        return output

    def _long_rows(
        self, examples: list[dict[str, Any]], kept: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(ids, completion mask)`` of every long row, chosen rows first; ``kept[i]`` is the
        number of response tokens of short row ``i`` left after truncation."""
        n = len(examples)
        sides = ("chosen", "rejected") if self.long_rows == "both" else ("chosen",)
        rows = []
        for side_index, side in enumerate(sides):
            for i, example in enumerate(examples):
                if LONG_PROMPT_IDS not in example:
                    raise ValueError(
                        f"{LONG_PROMPT_IDS}: missing from example {i}; prepare the dataset with "
                        "SoLoPOTrainer (which tokenizes the long-prompt column)"
                    )
                n_kept = kept[side_index * n + i]
                if n_kept == 0:
                    raise ValueError(
                        f"example {i}: the {side} response is truncated away on the short side "
                        f"(max_length={self.max_length}, prompt of {len(example['prompt_ids'])} tokens)"
                    )
                response = list(example[f"{side}_ids"][:n_kept])
                prompt = list(example[LONG_PROMPT_IDS])
                limit = self.max_long_length
                if limit is not None and len(prompt) + len(response) > limit:
                    layout = example.get(LONG_PROMPT_LAYOUT)
                    if layout is None:
                        raise ValueError(
                            f"{LONG_PROMPT_LAYOUT}: missing from example {i}, whose long row must be "
                            f"cut to max_long_length={limit}; prepare the dataset with SoLoPOTrainer "
                            "(which tokenizes the long-prompt column and records where it may be cut)"
                        )
                    prompt = cut_long_prompt(
                        prompt, layout, limit - len(response), f"{side} response", limit
                    )
                rows.append(
                    (
                        torch.tensor(prompt + response),
                        torch.tensor([0] * len(prompt) + [1] * len(response)),
                    )
                )
        return rows

    def _packed(
        self, output: dict[str, Any], long_rows: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, Any]:
        """The padded short rows (unpadded again: TRL pads on the right) and the long rows packed
        into one row (or several under ``max_packed_length``); reference columns kept."""
        short = [
            (ids[mask.bool()], completion[mask.bool()])
            for ids, mask, completion in zip(*(output.pop(key) for key in SHORT_KEYS), strict=True)
        ]
        sequences = short + long_rows
        packed = pack_sequences(
            [ids for ids, _ in sequences],
            [completion for _, completion in sequences],
            pad_token_id=self.pad_token_id,
            max_tokens=self.max_packed_length,
        )
        return {**output, **packed, PACKED_PAIRS: len(short) // 2}


def long_prompt_layout(short_ids: list[int], long_ids: list[int], index: int) -> dict[str, int]:
    """Where the long prompt ``long_ids`` may be cut, from the short prompt ``short_ids`` of the
    same example (dataset ``index``).

    The two prompts are the same template around different contexts: the tokens they share at
    the start (BOS, the system prompt, the user turn's header, the text before the passages) and
    at the end (the question, the end of the user turn, the generation prompt) are fixed; the
    tokens between are the long context. When the short prompt's own context (its tokens between
    the shared parts) lies in one piece inside the long context (one relevant passage, say), it is
    kept as well. Returns ``{"index", "prefix", "suffix", "keep_start", "keep_end"}``: the fixed
    token counts at each end and the kept span ``[keep_start, keep_end)`` of ``long_ids``
    (empty, at the context's end, when the short context is not found in one piece).
    """
    shortest = min(len(short_ids), len(long_ids))
    prefix = _common_prefix_length(short_ids, long_ids)
    suffix = _common_prefix_length(short_ids[::-1], long_ids[::-1])
    suffix = min(suffix, shortest - prefix)
    short_context = short_ids[prefix : len(short_ids) - suffix]
    keep_start = keep_end = len(long_ids) - suffix  # nothing to keep: the context's end
    if short_context:
        found = _find(long_ids[prefix : len(long_ids) - suffix], short_context)
        if found >= 0:
            keep_start = prefix + found
            keep_end = keep_start + len(short_context)
    return {
        "index": index,
        "prefix": prefix,
        "suffix": suffix,
        "keep_start": keep_start,
        "keep_end": keep_end,
    }


def cut_long_prompt(
    ids: list[int], layout: dict[str, int], budget: int, what: str, max_long_length: int
) -> list[int]:
    """``ids`` (a long prompt) cut to ``budget`` tokens by removing tokens of its context only.

    ``layout`` is :func:`long_prompt_layout`'s. The fixed tokens at both ends and the kept span
    (the short prompt's context) stay, and what remains of the context is one window around the
    kept span: tokens are removed from the context's start first (the farthest from the question),
    up to the kept span, then from its end (before the question). Without a kept span the context
    loses its first tokens. Raises
    ``ValueError`` naming the example when the fixed parts and the kept span alone exceed
    ``budget`` (``what`` names the response that takes the rest of ``max_long_length``).
    """
    prefix, suffix = layout["prefix"], layout["suffix"]
    keep_start, keep_end = layout["keep_start"], layout["keep_end"]
    fixed = prefix + suffix + (keep_end - keep_start)
    if fixed > budget:
        kept = keep_end - keep_start
        raise ValueError(
            f"max_long_length={max_long_length}: example {layout['index']}'s long prompt keeps "
            f"{prefix} tokens before its context (the template's start: BOS, system prompt, user "
            f"header) and {suffix} after it (the question and the generation prompt)"
            + (f", and the short prompt's context of {kept} tokens" if kept else "")
            + f"; with its {what} of {max_long_length - budget} tokens that is "
            f"{fixed + max_long_length - budget} tokens: raise max_long_length (or lower max_length)"
        )
    excess = len(ids) - budget
    if excess <= 0:
        return ids
    before = min(excess, keep_start - prefix)
    after = excess - before
    context_end = len(ids) - suffix
    return ids[:prefix] + ids[prefix + before : context_end - after] + ids[context_end:]


def _find(haystack: list[int], needle: list[int]) -> int:
    """The first index of ``needle`` as a contiguous run in ``haystack``, or -1 (a byte search:
    linear in the lengths, where a slice comparison at every start would be their product at
    128K-token prompts)."""
    hay, pin = array("q", haystack).tobytes(), array("q", needle).tobytes()
    width = array("q").itemsize
    at = hay.find(pin)
    while at >= 0 and at % width:  # a match must start on a token boundary
        at = hay.find(pin, at + 1)
    return at // width if at >= 0 else -1


def check_collator(collator: Any, options: SoLoPOOptions, *, padding_free: bool) -> None:
    """Raise ``ValueError`` naming the field for a :class:`DataCollatorForSoLoPO` whose rows do not
    match the loss options and the packing setting: the long rows it builds (``include_long``,
    ``long_rows``) and whether it packs (``padding_free``). Any other collator passes (the trainer
    refuses it where it needs the long rows)."""
    if not isinstance(collator, DataCollatorForSoLoPO):
        return
    wanted = {
        "include_long": options.uses_long,
        "padding_free": padding_free,
    }
    if options.uses_long:
        wanted["long_rows"] = options.ra_target
    why = {
        "include_long": f"solopo_alpha={options.alpha}",
        "padding_free": f"padding_free={padding_free}",
        "long_rows": f"solopo_ra_target={options.ra_target!r}",
    }
    for name, value in wanted.items():
        got = getattr(collator, name)
        if got != value:
            raise ValueError(
                f"data_collator: DataCollatorForSoLoPO.{name}={got!r} does not match the trainer's "
                f"{why[name]} (it needs {name}={value!r}); build the collator with the same options, "
                "or leave data_collator None"
            )


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, value: str | list, **chat_kwargs: Any
) -> list[int]:
    """Token ids of a string (the tokenizer's own special-token logic) or a message list (its chat
    template), the way TRL tokenizes the ``prompt`` column."""
    if isinstance(value, list):
        return list(
            tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)[
                "input_ids"
            ]
        )
    return list(tokenizer(text=value)["input_ids"])


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value


def tokenize_long_prompt(
    example: dict[str, Any],
    index: int,
    *,
    tokenizer: PreTrainedTokenizerBase,
    column: str,
    check_rejected: bool,
) -> dict[str, Any]:
    """``long_prompt_ids`` of one example already processed by ``DPOTrainer._prepare_dataset``.

    The long prompt is tokenized like the prompt (string: plain text; message list: the chat
    template with the generation prompt). A message-list long prompt next to a string prompt (e.g.
    Axolotl's rendered prompts) is rendered with the chat template first. The response tokens that
    follow the long prompt must equal the short side's ``chosen_ids`` (and ``rejected_ids`` when
    ``check_rejected``), or this raises: SoLo-RA compares rewards of the same token sequence.
    Also returns where the long prompt may be cut (``long_prompt_layout``, see
    :func:`long_prompt_layout`).
    """
    long_prompt = example[column]
    if _is_empty(long_prompt):
        raise ValueError(f"{column}: example {index} has an empty long prompt")
    short_is_chat = is_conversational(example)
    long_is_chat = isinstance(long_prompt, list)
    if not isinstance(long_prompt, (str, list)):
        raise ValueError(
            f"{column}: example {index}: expected a string or a list of messages, got {type(long_prompt).__name__}"
        )
    if short_is_chat and not long_is_chat:
        raise ValueError(
            f"{column}: example {index} is a string but 'prompt' is a list of messages; give the long "
            "prompt in the same conversational format"
        )
    chat_kwargs: dict[str, Any] = {}
    if short_is_chat:
        tools = example.get("tools")  # as TRL reads it: a list, or a JSON string of one
        tools = json.loads(tools) if isinstance(tools, str) else tools
        chat_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    elif long_is_chat:  # string prompt, message-list long prompt: render it like the prompt was
        long_prompt = tokenizer.apply_chat_template(
            long_prompt, tokenize=False, add_generation_prompt=True
        )
    sides = ("chosen", "rejected") if check_rejected else ("chosen",)
    prompt_ids = (
        _tokenize(tokenizer, long_prompt, add_generation_prompt=True, **chat_kwargs)
        if short_is_chat
        else _tokenize(tokenizer, long_prompt)
    )
    prompt_len = len(prompt_ids)
    completions = {}
    for side in sides:
        full = _tokenize(tokenizer, long_prompt + example[side], **chat_kwargs)
        prompt_len = min(prompt_len, _common_prefix_length(prompt_ids, full))
        completions[side] = full
    for side, full in completions.items():
        if full[prompt_len:] != list(example[f"{side}_ids"]):
            raise ValueError(
                f"{column}: example {index}: the {side} response tokenizes differently after the long "
                f"prompt ({tokenizer.decode(full[prompt_len:])!r}) than after the short prompt "
                f"({tokenizer.decode(example[f'{side}_ids'])!r}); make the long prompt end like the short "
                "one (e.g. with the same instruction) so that both responses are the same tokens"
            )
    prompt_ids = prompt_ids[:prompt_len]
    return {
        LONG_PROMPT_IDS: prompt_ids,
        LONG_PROMPT_LAYOUT: long_prompt_layout(list(example["prompt_ids"]), prompt_ids, index),
    }
