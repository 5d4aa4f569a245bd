"""The long prompt through LLaMA-Factory's data path: dataset column, converter, pairwise processor
and collator.

Where the long prompt comes from: a dataset column, ``long_prompt`` unless ``dataset_info.json``
maps another one (``"columns": {"long_prompt": "my_column"}``, like LLaMA-Factory's own columns).
It holds the *user message* of the long-context version of the task, as a string: it replaces the
content of the last user message of the prompt (after ``instruction`` + ``input`` are joined, for
alpaca; the last user turn, for sharegpt/openai), and the system prompt, tools and earlier turns
stay. The long row is then encoded with the same template as the short pair
(``template.encode_oneturn``), so the long chosen response is token for token the short one.

What each stage adds:

* converter (``align_dataset``): ``_long_prompt``, the prompt messages with the long user message;
* :class:`SoLoPOPairwiseDatasetProcessor`: ``long_chosen_input_ids`` / ``_attention_mask`` /
  ``_labels`` (and ``long_rejected_*`` for ``solopo_ra_target: both``), after LLaMA-Factory's own
  ``chosen_*`` / ``rejected_*``;
* :class:`SoLoPODataCollator`: pads the long rows into ``long_input_ids`` / ``long_attention_mask``
  / ``long_labels`` (chosen rows first) and carries precomputed reference columns as tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from llamafactory.data.collator import MultiModalDataCollatorForSeq2Seq
from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor

from .args import SoLoPOLlamaFactoryArguments

IGNORE_INDEX = -100
LONG_PROMPT_COLUMN = "long_prompt"
LONG_PROMPT = "_long_prompt"  # the converter's output column (LLaMA-Factory's names start with _)
# The batch keys of the long rows; the model sees them only in the long forward.
LONG_BATCH_KEYS = ("long_input_ids", "long_attention_mask", "long_labels")
# Precomputed reference sums (solopo_precompute_ref_log_probs), per example.
REF_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_long_chosen_logps",
    "ref_long_rejected_logps",
)


def long_prompt_column(dataset_attr: Any) -> str:
    """The column of ``dataset_attr`` (LLaMA-Factory's ``DatasetAttr``) that holds the long prompt."""
    return getattr(dataset_attr, "long_prompt", None) or LONG_PROMPT_COLUMN


def wrap_join(join: Callable[[Any, dict[str, Any]], None]) -> Callable[[Any, dict[str, Any]], None]:
    """``DatasetAttr.join`` that also reads ``columns.long_prompt`` of ``dataset_info.json``."""

    def joined(self: Any, attr: dict[str, Any]) -> None:
        join(self, attr)
        self.long_prompt = (attr.get("columns") or {}).get("long_prompt", LONG_PROMPT_COLUMN)

    return joined


@dataclass
class LongPromptConverter:
    """LLaMA-Factory's dataset converter plus ``_long_prompt``: the converted prompt messages with
    the last user message replaced by the example's long prompt (a string)."""

    converter: Any
    column: str
    dataset_name: str

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        output = self.converter(example)
        if self.column not in example:
            raise ValueError(
                f"long_prompt: dataset {self.dataset_name!r} has no column {self.column!r} (columns: "
                f"{sorted(example)}); solopo_alpha > 0 needs the long-context user message of every "
                "example: add the column, or map yours in dataset_info.json with "
                '"columns": {"long_prompt": "<your column>"}'
            )
        long_text = example[self.column]
        if not isinstance(long_text, str) or not long_text:
            raise ValueError(
                f"long_prompt: dataset {self.dataset_name!r}, column {self.column!r}: expected a "
                f"non-empty string (the long-context user message), got {type(long_text).__name__}"
            )
        prompt = [dict(message) for message in output["_prompt"]]
        if not prompt or prompt[-1]["role"] != "user":
            role = prompt[-1]["role"] if prompt else None
            raise ValueError(
                f"long_prompt: dataset {self.dataset_name!r}: the prompt must end with a user message "
                f"for the long prompt to replace, got {role!r}"
            )
        prompt[-1]["content"] = long_text
        output[LONG_PROMPT] = prompt
        return output


def wrap_get_dataset_converter(get_dataset_converter: Callable[..., Any]) -> Callable[..., Any]:
    """LLaMA-Factory's ``get_dataset_converter`` whose converters add ``_long_prompt``."""

    def get(name: str, dataset_attr: Any, data_args: Any) -> Any:
        converter = get_dataset_converter(name, dataset_attr, data_args)
        return LongPromptConverter(
            converter, long_prompt_column(dataset_attr), getattr(dataset_attr, "dataset_name", "?")
        )

    return get


def _is_valid(prompt: list[Any], response: list[Any]) -> bool:
    """LLaMA-Factory's own filter in ``PairwiseDatasetProcessor.preprocess_dataset``."""
    return len(prompt) % 2 == 1 and len(response) >= 2


@dataclass
class SoLoPOPairwiseDatasetProcessor(PairwiseDatasetProcessor):
    """LLaMA-Factory's pairwise processor (unchanged output) plus the long rows.

    Long row = the long prompt + the response, encoded with the same template as the short pair.
    The response tokens are the short pair's after LLaMA-Factory's ``cutoff_len`` truncation; a
    template whose response encoding depends on the prompt raises instead of scoring other tokens.
    ``solopo_cutoff_long_len`` cuts the long *prompt* from the left (the end of the prompt, the
    question and the assistant header, stays).
    """

    solopo: SoLoPOLlamaFactoryArguments | None = None

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        model_inputs = super().preprocess_dataset(examples)
        kept = [
            i
            for i in range(len(examples["_prompt"]))
            if _is_valid(examples["_prompt"][i], examples["_response"][i])
        ]
        if len(kept) != len(model_inputs["chosen_input_ids"]):  # LLaMA-Factory changed its filter
            raise RuntimeError(
                "SoLoPOPairwiseDatasetProcessor: the long rows no longer line up with "
                "LLaMA-Factory's examples; this LLaMA-Factory version is not supported"
            )
        for row, i in enumerate(kept):
            if any(examples[key][i] for key in ("_images", "_videos", "_audios")):
                raise ValueError(
                    "long_prompt: SoLoPO supports text-only examples (no images, videos or audios)"
                )
            for side, response_index in zip(self.solopo.long_rows, (0, 1)):
                input_ids, labels = self._encode_long_row(
                    examples[LONG_PROMPT][i],
                    examples["_response"][i][response_index],
                    examples["_system"][i],
                    examples["_tools"][i],
                    [t for t in model_inputs[f"{side}_labels"][row] if t != IGNORE_INDEX],
                )
                model_inputs[f"long_{side}_input_ids"].append(input_ids)
                model_inputs[f"long_{side}_attention_mask"].append([1] * len(input_ids))
                model_inputs[f"long_{side}_labels"].append(labels)
        return model_inputs

    def _encode_long_row(
        self,
        long_prompt: list[dict[str, str]],
        response: dict[str, str],
        system: str | None,
        tools: str | None,
        short_response_ids: list[int],
    ) -> tuple[list[int], list[int]]:
        prompt_ids, response_ids = self.template.encode_oneturn(
            self.tokenizer, long_prompt + [response], system, tools
        )
        if self.template.efficient_eos:
            response_ids = response_ids + [self.tokenizer.eos_token_id]
        if response_ids[: len(short_response_ids)] != short_response_ids:
            raise ValueError(
                "long_prompt: the template encodes the response differently after the long prompt "
                f"({response_ids[:8]}... vs {short_response_ids[:8]}...): SoLo-RA needs the same "
                "response tokens on both sides"
            )
        cap = self.solopo.solopo_cutoff_long_len
        if cap is not None:
            if len(short_response_ids) >= cap:
                raise ValueError(
                    f"solopo_cutoff_long_len: {cap} leaves no room for the long prompt before a "
                    f"{len(short_response_ids)}-token response"
                )
            prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(short_response_ids) - cap) :]
        input_ids = prompt_ids + short_response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + short_response_ids
        return input_ids, labels

    def print_data_example(self, example: dict[str, list[int]]) -> None:
        super().print_data_example(example)
        print("long_chosen_input_ids:\n{}".format(example["long_chosen_input_ids"]))
        print(
            "long_chosen_inputs:\n{}".format(
                self.tokenizer.decode(example["long_chosen_input_ids"], skip_special_tokens=False)
            )
        )


def wrap_get_dataset_processor(
    get_dataset_processor: Callable[..., Any], solopo: SoLoPOLlamaFactoryArguments
) -> Callable[..., Any]:
    """LLaMA-Factory's ``_get_dataset_processor`` returning :class:`SoLoPOPairwiseDatasetProcessor`
    for pairwise training data (``stage="rm"``, which the DPO stage uses)."""

    def get(
        data_args: Any,
        stage: str,
        template: Any,
        tokenizer: Any,
        processor: Any,
        do_generate: bool = False,
    ) -> Any:
        if stage != "rm" or do_generate:
            return get_dataset_processor(
                data_args, stage, template, tokenizer, processor, do_generate
            )
        return SoLoPOPairwiseDatasetProcessor(
            template=template,
            tokenizer=tokenizer,
            processor=processor,
            data_args=data_args,
            solopo=solopo,
        )

    return get


@dataclass
class SoLoPODataCollator:
    """LLaMA-Factory's ``PairwiseDataCollatorWithPadding`` (``short``, unchanged output) plus the
    long rows and the precomputed reference columns.

    Output: the short batch (``input_ids``, ``attention_mask``, ``labels`` of ``(2B, Ts)``, chosen
    rows first), ``long_input_ids`` / ``long_attention_mask`` / ``long_labels`` ``(R*B, Tl)``
    (``R`` = 1, or 2 for ``solopo_ra_target: both``, chosen rows first) padded by the same
    collator, and ``ref_*`` ``(B,)`` float32 when the examples carry them.
    """

    short: Any
    long_rows: tuple[str, ...] = ()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.short(features)
        if self.long_rows and f"long_{self.long_rows[-1]}_input_ids" not in features[0]:
            raise ValueError(
                "long_prompt: the examples have no long rows (long_chosen_input_ids, ...): the "
                "dataset was tokenized without solopo_alpha > 0 or with another solopo_ra_target "
                "(a tokenized_path saved earlier?); tokenize it again through this launcher"
            )
        if self.long_rows:
            long_features = [
                {
                    "input_ids": feature[f"long_{side}_input_ids"],
                    "attention_mask": feature[f"long_{side}_attention_mask"],
                    "labels": feature[f"long_{side}_labels"],
                    "images": None,
                    "videos": None,
                    "audios": None,
                }
                for side in self.long_rows
                for feature in features
            ]
            padded = MultiModalDataCollatorForSeq2Seq.__call__(self.short, long_features)
            for key in ("input_ids", "attention_mask", "labels"):
                batch[f"long_{key}"] = padded[key]
        for key in REF_COLUMNS:
            if key in features[0]:
                batch[key] = torch.tensor(
                    [feature[key] for feature in features], dtype=torch.float32
                )
        return batch
