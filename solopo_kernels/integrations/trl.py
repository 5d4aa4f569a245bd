"""SoLoPO for TRL: :class:`SoLoPOConfig` and :class:`SoLoPOTrainer` (the collator and the
long-prompt tokenization live in :mod:`.trl_data`).

The trainer is a ``trl.DPOTrainer`` (tested with TRL 1.16.0 and 1.14.1) that keeps TRL's data path
(preference format, standard or conversational; ``[chosen; rejected]`` stacking;
``completion_mask``; ``max_length`` truncation; EOS and pad-token handling) and adds a long-prompt
column holding the same task with the long context. Each step runs

* the policy on the short ``[chosen; rejected]`` rows and on the long+chosen rows (long+rejected
  too for ``solopo_ra_target="both"``), log-probs by this package's kernel inside the wrapped
  model's forward (see :mod:`.model_patch`): two forwards (short batch, long batch) when padded,
  **one** forward over a packed row with ``padding_free=True`` (see :mod:`.packing`);
* for dpo/ipo, the reference (a reference model, or the PEFT base with the adapter disabled) on
  the same rows, or the values precomputed with ``precompute_ref_log_probs=True``;
* :func:`solopo_kernels.solopo_loss` on the per-sequence sums.

Long-side truncation (``max_long_length``) cuts the long *prompt from the left*; the response on
the long side is always token-for-token the response of the short side (after the short side's own
``max_length`` truncation), or the collator raises.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoProcessor, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..context_parallel import scale_gradient, sum_over_group
from ..losses import SoLoPOOptions, solopo_loss
from .args import SoLoPOArguments, check_solopo_args, solopo_options
from .context_parallel import (
    ContextParallelPlan,
    accelerate_plan,
    check_combination,
    model_inputs,
    prepare_torch_models,
    torch_context,
)
from .liger import check_liger
from .model_patch import IGNORE_INDEX, patch_solopo_forward
from .packing import check_packing_attention, count_sequences, is_packed, iter_packs
from .trl_data import (
    LONG_KEYS,
    LONG_PROMPT_IDS,
    REF_COLUMNS,
    SHORT_KEYS,
    DataCollatorForSoLoPO,
    tokenize_long_prompt,
)

__all__ = ["DataCollatorForSoLoPO", "SoLoPOConfig", "SoLoPOTrainer", "tokenize_long_prompt"]

logger = logging.getLogger(__name__)


@dataclass
class SequenceLogps:
    """Per-sequence response log-prob sums (float32) and token counts (int64) of one step.

    ``short_*`` are ``(2B,)`` (chosen rows first); ``long_*`` are ``(B,)`` or ``(2B,)``, or None
    when the long rows were not run.
    """

    short_logps: torch.Tensor
    short_lengths: torch.Tensor
    long_logps: torch.Tensor | None = None
    long_lengths: torch.Tensor | None = None


@dataclass
class SoLoPOConfig(SoLoPOArguments, DPOConfig):
    """``DPOConfig`` plus the SoLoPO options of :class:`~.args.SoLoPOArguments` (see docs/objective.md).

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


class SoLoPOTrainer(DPOTrainer):
    """Short-to-long preference optimization on top of ``trl.DPOTrainer``.

    Arguments are DPOTrainer's; ``args`` is a :class:`SoLoPOConfig` (or another ``DPOConfig`` that
    mixes in :class:`~.args.SoLoPOArguments`, like Axolotl's training arguments with the plugin
    loaded; it is checked by :func:`~.args.check_solopo_args`). The train/eval datasets
    are in TRL's preference format plus ``args.long_prompt_column``.

    * Reference: with a reference-free loss type (simpo, orpo, cpo) no reference model is loaded,
      kept or run (a passed ``ref_model`` is released with a warning). For dpo/ipo without a
      ``ref_model``: PEFT models use the base with the adapter disabled; a full model built in
      memory (no path in ``config._name_or_path`` to reload it from) is copied, frozen, as the
      reference, and the log says so.
    * ``padding_free=True`` (``DPOConfig``'s field, which TRL's DPOTrainer ignores with a warning;
      honoured here) packs each step into one row: one policy forward and one reference forward
      per step (``max_packed_length`` caps the tokens per row, at the price of more forwards). The
      model's attention must keep packed sequences apart (``flash_attention_2`` on CUDA,
      ``sdpa``/``eager``); any other ``attn_implementation`` raises.
    * Context parallelism (accelerate's ``ParallelismConfig(cp_size=N)`` with FSDP2, or Axolotl's
      ``context_parallel_size``): every row is split along its length over the group, the
      per-sequence sums are all-reduced and the gradient scaled for the engine's averaging (see
      :mod:`.context_parallel`). Not combined with ``padding_free``.
    """

    _tag_names = ["trl", "dpo", "solopo"]
    _name = "SoLoPO"
    # Who cuts the context-parallel slices: accelerate's PyTorch context parallelism through this
    # trainer ("accelerate"), or an engine hook on the model (the Axolotl subclass: "engine").
    _context_parallel_engine = "accelerate"

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
        self._solopo = check_solopo_args(args)
        check_liger(args, model, ref_model)
        self._check_peft_zero3_checkpointing(model, args, kwargs.get("peft_config"))
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
        if ref_model is None and not reference_free:
            ref_model = self._reference_copy(model, args, kwargs.get("peft_config"))
        user_precompute, user_padding_free = args.precompute_ref_log_probs, args.padding_free
        if reference_free:
            # DPOTrainer keeps no reference model when it precomputes reference log-probs (outside
            # FSDP); our _precompute_ref_logps is a no-op for reference-free types, so this route
            # loads, keeps and runs no reference at all. The flag is restored right after. Costs:
            # TRL 1.16 hashes the policy's weights once (its precompute cache key), and under FSDP
            # it still loads a reference from the model path, freed below.
            args.precompute_ref_log_probs = True
        # DPOTrainer turns padding_free off with a warning ("temporarily unavailable"); the
        # collator here packs, so the flag is hidden from it and restored right after.
        args.padding_free = False
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
            args.padding_free = user_padding_free
        self.padding_free = user_padding_free
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
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if is_peft_model(self.model) and any(
            hasattr(head, name) for name in ("base_layer", "original_module", "modules_to_save")
        ):
            # The fused kernel reads lm_head.weight: an adapter or trainable copy around the head
            # would be silently skipped (wrong log-probs, no gradient for it).
            raise ValueError(
                f"peft_config: an adapter on lm_head ({type(head).__name__}) is not supported: the "
                "fused log-prob kernel reads lm_head.weight; leave lm_head out of target_modules and "
                "modules_to_save"
            )
        if user_padding_free:
            check_packing_attention(self.model)
            if self.ref_model is not None:
                check_packing_attention(self.ref_model)
            if not getattr(self.data_collator, "padding_free", False):
                raise ValueError(
                    "padding_free: the data_collator does not pack; pass a DataCollatorForSoLoPO with "
                    "padding_free=True, or leave data_collator None"
                )
        check_combination(self.accelerator, padding_free=user_padding_free)
        if self._context_parallel_engine == "accelerate" and accelerate_plan(self.accelerator):
            prepare_torch_models(self.model, self.ref_model)
        self._cp_plan_cache: list[ContextParallelPlan | None] = []

    def _check_peft_zero3_checkpointing(self, model: Any, args: Any, peft_config: Any) -> None:
        """DPOTrainer forces reentrant gradient checkpointing for PEFT under DeepSpeed ZeRO-3, and
        reentrant checkpointing breaks several policy forwards per step (DeepSpeed asserts while
        it reduces the gradients). One forward per step (packing, no cap; or alpha = 0) is fine."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        one_forward = not self._solopo.uses_long or (
            args.padding_free and getattr(args, "max_packed_length", None) is None
        )
        if (
            peft
            and args.gradient_checkpointing
            and is_deepspeed_zero3_enabled()
            and not one_forward
        ):
            raise ValueError(
                "gradient_checkpointing: with PEFT under DeepSpeed ZeRO-3, TRL switches to reentrant "
                "checkpointing, which breaks SoLoPO's two policy forwards per step; set "
                "padding_free=True (one forward per step) or gradient_checkpointing=False"
            )

    @staticmethod
    def _reference_copy(model: Any, args: Any, peft_config: Any) -> torch.nn.Module | None:
        """A frozen copy of an in-memory policy to serve as the dpo/ipo reference, or None where
        DPOTrainer finds one itself (a model path to reload, a PEFT base, precomputed values)."""
        if (
            isinstance(model, str)
            or peft_config is not None
            or is_peft_model(model)
            or args.precompute_ref_log_probs
            or getattr(model.config, "_name_or_path", "")
        ):
            return None
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "ref_model: required for a dpo/ipo run under DeepSpeed ZeRO-3 whose model was built in "
                "memory (its config has no path to reload the reference from, and a partitioned model "
                "cannot be copied); pass ref_model, or save_pretrained the model and pass its path"
            )
        logger.warning(
            "ref_model: none given and the model was built in memory (config._name_or_path is empty, "
            "so DPOTrainer could not reload it): using a frozen copy of the policy as it is now as the "
            "reference. Pass ref_model to use another one."
        )
        reference = copy.deepcopy(model)
        reference.requires_grad_(False)
        return reference.eval()

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
            padding_free=args.padding_free,
            max_packed_length=args.max_packed_length,
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
    def _long_rows_in_batch(self) -> int:
        """Long rows per pair in a collated batch: 0 with alpha = 0, 2 for ``"both"``, else 1."""
        options = self._solopo
        return options.long_rows_per_pair if options.uses_long else 0

    def _step_logps(
        self, model: torch.nn.Module, inputs: dict[str, Any], *, with_long: bool
    ) -> SequenceLogps:
        """Per-sequence sums and counts of the short rows and, ``with_long``, of the long rows,
        computed inside ``model``'s forward: two forwards for a padded batch (short, then long),
        one per packed row for a packed batch (one in all without ``max_packed_length``)."""
        patch_solopo_forward(self.accelerator.unwrap_model(model))
        if is_packed(inputs):
            return self._packed_logps(model, inputs, with_long=with_long)
        plan = self._cp_plan
        run = self._padded_logps if plan is None else functools.partial(self._sliced_logps, plan)
        short = run(model, inputs, SHORT_KEYS)
        long = run(model, inputs, LONG_KEYS) if with_long else (None, None)
        return SequenceLogps(*short, *long)

    # -------------------------------------------------------- context parallelism
    @property
    def _cp_plan(self) -> ContextParallelPlan | None:
        """The context-parallel plan, resolved on first use (engines register their group late)
        and kept; None without context parallelism."""
        cache = getattr(self, "_cp_plan_cache", None)
        if cache is None:  # DPOTrainer.__init__ (e.g. its reference precompute) runs before ours
            return None
        if not cache:
            cache.append(self._context_parallel_plan())
        return cache[0]

    def _context_parallel_plan(self) -> ContextParallelPlan | None:
        """Where the plan comes from: accelerate's ``parallelism_config`` here; the Axolotl
        trainer overrides it with Axolotl's context-parallel group."""
        return accelerate_plan(self.accelerator)

    def _prepare_context_parallel_inputs(self, model: Any, inputs: dict[str, Any]) -> tuple:
        """Trainer's hook around a training/eval step: accelerate's context-parallel context
        (ring attention for the step's forwards and backward), with the slices cut by this trainer
        (see :func:`.context_parallel.torch_context`)."""
        plan = self._cp_plan
        if plan is None or not plan.shard_inputs or accelerate_plan(self.accelerator) is None:
            return contextlib.nullcontext, inputs
        return torch_context(self.accelerator, plan), inputs

    def _sliced_logps(
        self,
        plan: ContextParallelPlan,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        keys: tuple[str, str, str],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's *partial* ``(rows,)`` sums and counts of one padded batch, split along the
        rows' length over ``plan.group`` (all-reduced later, in the loss)."""
        input_ids, _, completion_mask = (inputs[key] for key in keys)
        pad_token_id = getattr(self.data_collator, "pad_token_id", 0) or 0
        kwargs = model_inputs(plan, input_ids, completion_mask, pad_token_id=pad_token_id)
        out = model(**kwargs, solopo_logps=True, use_cache=False)
        return out.logps, out.lengths

    @staticmethod
    def _padded_logps(
        model: torch.nn.Module, inputs: dict[str, Any], keys: tuple[str, str, str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows,)`` sums and counts of one padded batch (``keys``: ids, attention, completion)."""
        input_ids, attention_mask, completion_mask = (inputs[key] for key in keys)
        labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            solopo_labels=labels,
            use_cache=False,
        )
        return out.logps, out.lengths

    def _packed_logps(
        self, model: torch.nn.Module, inputs: dict[str, Any], *, with_long: bool
    ) -> SequenceLogps:
        """The packed rows of ``inputs``, one forward each (only their short prefix when the long
        sequences are not needed), summed per sequence and split into short and long."""
        n_sequences = count_sequences(inputs)
        n_pairs = n_sequences // (2 + self._long_rows_in_batch())
        wanted = n_sequences if with_long else 2 * n_pairs
        sums = counts = None
        for pack in iter_packs(inputs, sequences=wanted):
            labels = pack.input_ids.masked_fill(pack.completion_mask == 0, IGNORE_INDEX)
            out = model(
                input_ids=pack.input_ids,
                position_ids=pack.position_ids,
                solopo_labels=labels,
                solopo_sequence_ids=pack.sequence_ids,
                use_cache=False,
            )
            # Per-row results have one entry per sequence id up to the row's last; a sequence lies
            # in one row, so adding the rows (zeros elsewhere) is exact.
            logps = F.pad(out.logps, (0, wanted - out.logps.shape[0]))
            lengths = F.pad(out.lengths, (0, wanted - out.lengths.shape[0]))
            sums = logps if sums is None else sums + logps
            counts = lengths if counts is None else counts + lengths
        short = 2 * n_pairs
        if not with_long:
            return SequenceLogps(sums, counts)
        return SequenceLogps(sums[:short], counts[:short], sums[short:], counts[short:])

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
        """Reference sums ``(B,)`` per :data:`REF_COLUMNS` name that the loss needs (one forward
        over the packed rows when packed, the short and long batches otherwise)."""
        with self._reference_mode():
            step = self._step_logps(model, inputs, with_long=self._solopo.needs_long_reference)
            plan = self._cp_plan
            if plan is not None:  # partial sums of this rank's slices: the full ones are their sum
                step.short_logps = sum_over_group(step.short_logps, plan.group)
                if step.long_logps is not None:
                    step.long_logps = sum_over_group(step.long_logps, plan.group)
        chosen, rejected = step.short_logps.chunk(2)
        refs = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
        if step.long_logps is not None:
            n = chosen.shape[0]
            refs["ref_long_chosen_logps"] = step.long_logps[:n]
            if self._solopo.ra_target == "both":
                refs["ref_long_rejected_logps"] = step.long_logps[n:]
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
        plan = self._cp_plan
        step = self._step_logps(model, inputs, with_long=options.uses_long)
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
            step.short_logps,
            step.short_lengths,
            step.long_logps,
            step.long_lengths,
            ref_short_logps=ref_short,
            ref_long_logps=ref_long,
            context_parallel_group=plan.group if plan is not None else None,
            **options.as_kwargs(),
        )
        self._log_metrics(mode, out.metrics)
        if plan is not None:  # the engine averages the ranks' partial gradients: make it a sum
            return scale_gradient(out.loss, plan.gradient_scale)
        return out.loss

    def _log_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """Batch means of the loss metrics (docs/objective.md), averaged over processes (one gather for all)."""
        names = list(metrics)
        values = torch.stack([metrics[k].float() for k in names]).unsqueeze(0)
        means = self.accelerator.gather(values).mean(0).tolist()
        for key, value in zip(names, means, strict=True):
            self._metrics[mode][key].append(value)
