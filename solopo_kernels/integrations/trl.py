"""SoLoPO for TRL: :class:`SoLoPOConfig`, :class:`DataCollatorForSoLoPO` and :class:`SoLoPOTrainer`.

The trainer is a ``trl.DPOTrainer`` (tested with TRL 1.16.0 and 1.14.1) that keeps TRL's data path
(preference format, standard or conversational; ``[chosen; rejected]`` stacking;
``completion_mask``; ``max_length`` truncation; EOS and pad-token handling) and adds a long-prompt
column holding the same task with the long context. Each step runs

* the policy on the short ``[chosen; rejected]`` batch and on the long+chosen batch (long+rejected
  too for ``solopo_ra_target="both"``): two forwards, log-probs by this package's kernel inside
  the wrapped model's forward (see :mod:`.model_patch`);
* for dpo/ipo, the reference (a reference model, or the PEFT base with the adapter disabled) on
  the same rows, or the values precomputed with ``precompute_ref_log_probs=True``;
* :func:`solopo_kernels.solopo_loss` on the per-sequence sums.

Long-side truncation (``max_long_length``) cuts the long *prompt from the left*; the response on
the long side is always token-for-token the response of the short side (after the short side's own
``max_length`` truncation), or the collator raises.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoProcessor, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad, use_adapter

from ..losses import SoLoPOOptions, solopo_loss
from .args import SoLoPOArguments, check_solopo_args, solopo_options
from .liger import check_liger
from .model_patch import IGNORE_INDEX, patch_solopo_forward

logger = logging.getLogger(__name__)

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


@dataclass
class SoLoPOConfig(SoLoPOArguments, DPOConfig):
    """``DPOConfig`` plus the SoLoPO options of :class:`~.args.SoLoPOArguments` (SPEC §2).

    ``beta`` and ``label_smoothing`` (dpo only) are DPOConfig's. DPO-only loss options that SoLoPO
    does not implement (``loss_type``, ``loss_weights``, ``ld_alpha``, ``f_divergence_type``,
    ``use_weighting``) must stay at their defaults, and so must ``truncation_mode="keep_start"``:
    a non-default value raises instead of being silently ignored (see :func:`~.args.check_solopo_args`).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        check_solopo_args(self)

    @property
    def solopo_options(self) -> SoLoPOOptions:
        """The validated loss options passed to :func:`solopo_kernels.solopo_loss`."""
        return solopo_options(self)


@dataclass
class DataCollatorForSoLoPO(DataCollatorForPreference):
    """``DataCollatorForPreference`` plus the long rows.

    Each example holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL) and
    ``long_prompt_ids``; optionally the ``ref_*_logps`` scalars of :data:`REF_COLUMNS`. Output:
    TRL's ``input_ids``/``attention_mask``/``completion_mask`` of shape ``(2B, Ts)`` (chosen rows
    first), plus ``long_input_ids``/``long_attention_mask``/``long_completion_mask`` of shape
    ``(B, Tl)`` (``long_rows="chosen"``) or ``(2B, Tl)`` (``"both"``, chosen rows first), and the
    reference columns present in the examples as ``(B,)`` float tensors.

    A long row is ``long_prompt_ids + r`` where ``r`` is the response exactly as it is kept on the
    short side (after ``max_length`` truncation). With ``max_long_length`` the long prompt is cut
    from the left so that the row fits; a response that cannot fit with at least one prompt token,
    or that the short side truncated away entirely, raises ``ValueError``.
    """

    max_long_length: int | None = None
    long_rows: str = "chosen"
    include_long: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.truncation_mode != "keep_start":
            raise ValueError(
                f"truncation_mode: DataCollatorForSoLoPO supports 'keep_start', got {self.truncation_mode!r}"
            )
        output = super().torch_call(examples)
        present = [name for name in REF_COLUMNS[2:] if name in examples[0]]
        for name in present:
            output[name] = torch.tensor([example[name] for example in examples])
        if not self.include_long:
            return output
        n = len(examples)
        kept = output["completion_mask"].sum(-1).tolist()  # response tokens kept per short row
        sides = ("chosen", "rejected") if self.long_rows == "both" else ("chosen",)
        rows, masks = [], []
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
                if self.max_long_length is not None:
                    budget = self.max_long_length - len(response)
                    if budget < 1:
                        raise ValueError(
                            f"max_long_length={self.max_long_length}: example {i}'s {side} response has "
                            f"{len(response)} tokens and leaves no room for the long prompt; raise "
                            "max_long_length or lower max_length"
                        )
                    prompt = prompt[-budget:]  # cut from the left: the instruction at the end stays
                rows.append(torch.tensor(prompt + response))
                masks.append(torch.tensor([0] * len(prompt) + [1] * len(response)))
        pad_kw = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        output[LONG_PREFIX + "input_ids"] = pad(rows, padding_value=self.pad_token_id, **pad_kw)
        output[LONG_PREFIX + "attention_mask"] = pad(
            [torch.ones_like(r) for r in rows], padding_value=0, **pad_kw
        )
        output[LONG_PREFIX + "completion_mask"] = pad(masks, padding_value=0, **pad_kw)
        return output


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
) -> dict[str, list[int]]:
    """``long_prompt_ids`` of one example already processed by ``DPOTrainer._prepare_dataset``.

    The long prompt is tokenized like the prompt (string: plain text; message list: the chat
    template with the generation prompt). A message-list long prompt next to a string prompt (e.g.
    Axolotl's rendered prompts) is rendered with the chat template first. The response tokens that
    follow the long prompt must equal the short side's ``chosen_ids`` (and ``rejected_ids`` when
    ``check_rejected``), or this raises: SoLo-RA compares rewards of the same token sequence.
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
    return {LONG_PROMPT_IDS: prompt_ids[:prompt_len]}


class SoLoPOTrainer(DPOTrainer):
    """Short-to-long preference optimization on top of ``trl.DPOTrainer``.

    Arguments are DPOTrainer's; ``args`` is a :class:`SoLoPOConfig` (or another ``DPOConfig`` that
    mixes in :class:`~.args.SoLoPOArguments`, like Axolotl's training arguments with the plugin
    loaded; it is checked by :func:`~.args.check_solopo_args`). The train/eval datasets
    are in TRL's preference format plus ``args.long_prompt_column``. With a reference-free loss type
    (simpo, orpo, cpo) no reference model is loaded, kept or run (a passed ``ref_model`` is
    released with a warning).
    """

    _tag_names = ["trl", "dpo", "solopo"]
    _name = "SoLoPO"

    def __init__(
        self,
        model: Any,
        ref_model: torch.nn.Module | None = None,
        args: SoLoPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("compute_metrics") is not None:
            raise ValueError("compute_metrics: not supported, SoLoPOTrainer computes no logits")
        if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
            logger.warning(
                "DeepSpeed ZeRO-3: the lm_head is all-gathered for the log-prob kernel's forward and again for "
                "its backward (see model_patch.zero3_gather). This path is tested with a simulated partitioning, "
                "not under DeepSpeed itself; compare a few steps against ZeRO-2 before a long run."
            )
        self._solopo = check_solopo_args(args)
        check_liger(args, model, ref_model)
        if processing_class is None:  # what DPOTrainer would load, needed here for the collator
            processing_class = AutoProcessor.from_pretrained(
                model if isinstance(model, str) else model.config._name_or_path
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise ValueError(
                "processing_class: SoLoPOTrainer supports text tokenizers only (no vision processors)"
            )
        if data_collator is None:
            data_collator = self._default_collator(processing_class, args)
        elif self._solopo.uses_long and not isinstance(data_collator, DataCollatorForSoLoPO):
            raise ValueError(
                f"data_collator: expected a DataCollatorForSoLoPO (it builds the long rows), got "
                f"{type(data_collator).__name__}; leave it None for the default"
            )
        reference_free = not self._solopo.needs_reference
        if reference_free and ref_model is not None:
            logger.warning(
                "ref_model: not used by solopo_loss_type=%r (reference-free); released",
                args.solopo_loss_type,
            )
            ref_model = None
        user_precompute = args.precompute_ref_log_probs
        if reference_free:
            # DPOTrainer keeps no reference model when it precomputes reference log-probs (outside
            # FSDP); our _precompute_ref_logps is a no-op for reference-free types, so this route
            # loads, keeps and runs no reference at all. The flag is restored right after. Costs:
            # TRL 1.16 hashes the policy's weights once (its precompute cache key), and under FSDP
            # it still loads a reference from the model path, freed below.
            args.precompute_ref_log_probs = True
        try:
            super().__init__(
                model,
                ref_model,
                args,
                data_collator,
                train_dataset,
                eval_dataset,
                processing_class,
                **kwargs,
            )
        finally:
            args.precompute_ref_log_probs = user_precompute
        self.precompute_ref_logps = user_precompute and not reference_free
        if reference_free:
            self.ref_model = None  # under FSDP, TRL 1.16 loaded one for the precompute
        if (
            is_peft_model(self.model)
            and self.model.peft_config[self.model.active_adapter].is_prompt_learning
        ):
            raise ValueError(
                "peft_config: prompt-learning PEFT methods are not supported (they shift the positions)"
            )

    @staticmethod
    def _default_collator(
        tokenizer: PreTrainedTokenizerBase, args: SoLoPOConfig
    ) -> DataCollatorForSoLoPO:
        # DPOTrainer's pad-token fallback, applied here because the collator is built before it runs.
        pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        if pad_token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token: {pad_token!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token
        options = solopo_options(args)
        return DataCollatorForSoLoPO(
            pad_token_id=tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
            max_long_length=args.max_long_length,
            long_rows=options.ra_target,
            include_long=options.uses_long,
        )

    # ------------------------------------------------------------------ data
    def _prepare_dataset(
        self, dataset: Any, processing_class: Any, args: SoLoPOConfig, dataset_name: str
    ) -> Any:
        # Runs inside DPOTrainer.__init__ before Trainer.__init__: use `args`, not `self.args`.
        options = solopo_options(args)
        column = args.long_prompt_column
        first = next(iter(dataset), None)
        if (
            options.uses_long
            and first is not None
            and column not in first
            and LONG_PROMPT_IDS not in first
        ):
            raise ValueError(
                f"long_prompt_column: the {dataset_name} dataset has no column {column!r} (columns: "
                f"{list(first)}); add the long-context prompt or set long_prompt_column"
            )
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        first = next(iter(dataset), None)  # None: max_length dropped every example
        if not options.uses_long or first is None or LONG_PROMPT_IDS in first:
            return dataset
        map_kwargs: dict[str, Any] = {"with_indices": True}
        if isinstance(dataset, Dataset):
            map_kwargs.update(
                num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} long prompts"
            )
        return dataset.map(
            tokenize_long_prompt,
            fn_kwargs={
                "tokenizer": self._tokenizer,
                "column": column,
                "check_rejected": options.ra_target == "both",
            },
            **map_kwargs,
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for name in (LONG_PROMPT_IDS, *REF_COLUMNS):
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    # --------------------------------------------------------------- forward
    def _sequence_logps(
        self, model: torch.nn.Module, inputs: dict[str, Any], prefix: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row response log-prob sums ``(rows,)`` float32 and counts ``(rows,)`` of the short
        (``prefix=""``) or long (``prefix="long_"``) rows, computed inside ``model``'s forward."""
        patch_solopo_forward(self.accelerator.unwrap_model(model))
        if prefix:
            kwargs = {k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}
        else:  # TRL's keys, minus everything this trainer added (prefixed) and the mask
            kwargs = {k: v for k, v in inputs.items() if not k.startswith((LONG_PREFIX, "ref_"))}
        completion_mask = kwargs.pop("completion_mask")
        labels = kwargs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        out = model(**kwargs, solopo_labels=labels, use_cache=False)
        return out.logps, out.lengths

    @contextlib.contextmanager
    def _reference_mode(self) -> Iterator[None]:
        """No grad, no checkpointing and, for PEFT without a reference model, the adapter off."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(
                unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
            )
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
        ):
            yield

    def _reference_logps(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Reference sums ``(B,)`` per :data:`REF_COLUMNS` name that the loss needs."""
        n = inputs["input_ids"].shape[0] // 2
        with self._reference_mode():
            short, _ = self._sequence_logps(model, inputs, "")
            refs = {"ref_chosen_logps": short[:n], "ref_rejected_logps": short[n:]}
            if self._solopo.needs_long_reference:
                long, _ = self._sequence_logps(model, inputs, LONG_PREFIX)
                refs["ref_long_chosen_logps"] = long[:n]
                if self._solopo.ra_target == "both":
                    refs["ref_long_rejected_logps"] = long[n:]
        return refs

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Adds the reference columns the loss needs (``ref_chosen_logps``, ``ref_rejected_logps``
        and, with a long reference, ``ref_long_chosen_logps`` / ``ref_long_rejected_logps``) in one
        pass; reference-free loss types add nothing. Not cached across runs."""
        if not self._solopo.needs_reference:
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs: not supported with an IterableDataset")
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "precompute_ref_log_probs: not supported with DeepSpeed by SoLoPOTrainer"
            )
        loader = self.accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                shuffle=False,
            )
        )
        model = self.ref_model if self.ref_model is not None else self.model
        columns: dict[str, list[torch.Tensor]] = defaultdict(list)
        for batch in tqdm(
            loader,
            desc=f"Reference log-probs ({name})",
            disable=not self.accelerator.is_local_main_process,
        ):
            refs = self.accelerator.gather_for_metrics(self._reference_logps(model, batch))
            for key, value in refs.items():
                columns[key].append(value.float().cpu())
        for key, parts in columns.items():
            if key in dataset.column_names:
                dataset = dataset.remove_columns(key)
            dataset = dataset.add_column(key, torch.cat(parts).tolist())
        return dataset

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool
    ) -> torch.Tensor:
        if return_outputs:
            raise ValueError(
                "return_outputs: SoLoPOTrainer computes no logits (use prediction_loss_only)"
            )
        mode = "train" if self.model.training else "eval"
        options = self._solopo
        short_logps, short_lengths = self._sequence_logps(model, inputs, "")
        long_logps = long_lengths = None
        if options.uses_long:
            long_logps, long_lengths = self._sequence_logps(model, inputs, LONG_PREFIX)
        refs: dict[str, torch.Tensor] = {}
        if options.needs_reference:
            if self.precompute_ref_logps:
                refs = {k: inputs[k] for k in REF_COLUMNS if k in inputs}
            else:
                refs = self._reference_logps(
                    self.ref_model if self.ref_model is not None else model, inputs
                )
        ref_short = ref_long = None
        if options.needs_reference:
            ref_short = torch.cat([refs["ref_chosen_logps"], refs["ref_rejected_logps"]])
        if options.needs_long_reference:
            names = ("ref_long_chosen_logps", "ref_long_rejected_logps")[
                : options.long_rows_per_pair
            ]
            missing = [k for k in names if k not in refs]
            if missing:
                raise ValueError(
                    f"{missing[0]}: missing from the batch; precompute it with SoLoPOTrainer"
                )
            ref_long = torch.cat([refs[k] for k in names])
        out = solopo_loss(
            short_logps,
            short_lengths,
            long_logps,
            long_lengths,
            ref_short_logps=ref_short,
            ref_long_logps=ref_long,
            loss_type=options.loss_type,
            beta=options.beta,
            alpha=options.alpha,
            gamma=options.gamma,
            label_smoothing=options.label_smoothing,
            ra_target=options.ra_target,
            ra_distance=options.ra_distance,
            ra_use_reference=options.ra_use_reference,
        )
        self._log_metrics(mode, out.metrics)
        return out.loss

    def _log_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """Batch means of the SPEC metrics, averaged over processes (one gather for all)."""
        names = list(metrics)
        values = torch.stack([metrics[k].float() for k in names]).unsqueeze(0)
        means = self.accelerator.gather(values).mean(0).tolist()
        for key, value in zip(names, means, strict=True):
            self._metrics[mode][key].append(value)
