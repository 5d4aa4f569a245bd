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

Long-side truncation (``max_long_length``) removes tokens of the long *context* only: the
template's start and the question stay (see :func:`.trl_data.cut_long_prompt`); the response on
the long side is always token-for-token the response of the short side (after the short side's own
``max_length`` truncation), or the collator raises.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from ..context_parallel import scale_gradient, sum_over_group
from ..losses import SoLoPOOptions, solopo_loss
from .args import (
    HeadKernel,
    SoLoPOArguments,
    check_parallel_setup,
    check_solopo_args,
    head_kernel,
    solopo_options,
)
from .context_parallel import (
    ContextParallelPlan,
    accelerate_plan,
    model_inputs,
    prepare_torch_models,
    torch_context,
)
from .liger import check_liger
from .model_patch import (
    IGNORE_INDEX,
    SoLoPOLogProbsOutput,
    head_temperature,
    patch_solopo_forward,
)
from .moe import RouterLoad, aux_loss_coefficient, moe_sizes
from .packing import (
    PACKED_PAIRS,
    PACKED_SEQUENCE_IDS,
    check_packing_attention,
    count_sequences,
    is_packed,
    iter_packs,
    warn_dense_packing,
)
from .trl_data import (
    LONG_KEYS,
    LONG_PROMPT_IDS,
    LONG_PROMPT_LAYOUT,
    REF_COLUMNS,
    SHORT_KEYS,
    DataCollatorForSoLoPO,
    check_collator,
    tokenize_long_prompt,
)

__all__ = [
    "DataCollatorForSoLoPO",
    "HeadKernel",
    "SoLoPOConfig",
    "SoLoPOTrainer",
    "tokenize_long_prompt",
]

logger = logging.getLogger(__name__)


@dataclass
class SequenceLogps:
    """Per-sequence response log-prob sums (float32) and token counts (int64) of one step.

    ``short_*`` are ``(2B,)`` (chosen rows first); ``long_*`` are ``(B,)`` or ``(2B,)``, or None
    when the long rows were not run. ``router_load``: an MoE policy's router sums over all the
    step's forwards (:mod:`.moe`), or None.
    """

    short_logps: torch.Tensor
    short_lengths: torch.Tensor
    long_logps: torch.Tensor | None = None
    long_lengths: torch.Tensor | None = None
    router_load: RouterLoad | None = None


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
        if self.head_kernel is not None:
            # Kept as plain values (a dict), so that to_dict()/to_json_string() keep working.
            self.head_kernel = head_kernel(self).to_dict()

    @property
    def solopo_options(self) -> SoLoPOOptions:
        """The validated loss options passed to :func:`solopo_kernels.solopo_loss`."""
        return solopo_options(self)

    @property
    def head_kernel_settings(self) -> HeadKernel:
        """The validated kernel settings passed to the log-prob kernel (``head_kernel``)."""
        return head_kernel(self)


_SOLOPO_PAPER = {
    "title": "SoLoPO: Unlocking Long-Context Capabilities in LLMs via Short-to-Long Preference "
    "Optimization",
    "id": "2505.11166",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @misc{solopo2025,
            title         = {{SoLoPO: Unlocking Long-Context Capabilities in LLMs via Short-to-Long Preference Optimization}},
            year          = 2025,
            eprint        = {2505.11166},
            archivePrefix = {arXiv},
            url           = {https://arxiv.org/abs/2505.11166},
        }"""),
}


class _NoReference(torch.nn.Module):
    """What DPOTrainer receives as ``ref_model`` for a reference-free loss type (simpo, orpo, cpo).

    Given no reference, DPOTrainer loads one from the model's path (under FSDP even when it is
    told to precompute), and its precompute route hashes every weight of the policy. This
    stand-in, with a single one-element frozen parameter, is prepared like a reference (DDP, FSDP2,
    DeepSpeed) at no cost, is never run, and is dropped as soon as DPOTrainer's ``__init__``
    returns.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config  # read by TRL's fused-head patch and DeepSpeed preparation
        # DeepSpeed's ZeRO-3 engine reads the dtype of the module's first parameter.
        self.placeholder = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("reference-free loss type: there is no reference model to run")


class _DropPaddingFreeWarning(logging.Filter):
    """DPOTrainer logs that it turns ``padding_free`` off; this trainer packs itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "padding_free=True` is temporarily unavailable" not in record.getMessage()


def _model_config(model: Any, args: Any) -> Any:
    """The config of ``model`` (an instance, or a path DPOTrainer will load), read without
    loading any weights."""
    if isinstance(model, str):
        return AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    return model.config


def _deepspeed_requested(args: Any) -> bool:
    """Whether the arguments (or ``accelerate launch``) ask for DeepSpeed."""
    return bool(getattr(args, "deepspeed", None)) or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    )


def _context_parallel_size(args: Any) -> int:
    """The context-parallel size the arguments ask for (accelerate's ``parallelism_config``)."""
    config = getattr(args, "parallelism_config", None)
    if config is None or not getattr(config, "cp_enabled", False):
        return 1
    return int(config.cp_size)


class SoLoPOTrainer(DPOTrainer):
    """Short-to-long preference optimization on top of ``trl.DPOTrainer``.

    Arguments are DPOTrainer's; ``args`` is a :class:`SoLoPOConfig` (or another ``DPOConfig`` that
    mixes in :class:`~.args.SoLoPOArguments`, like Axolotl's training arguments with the plugin
    loaded; it is checked by :func:`~.args.check_solopo_args`). The train/eval datasets
    are in TRL's preference format plus ``args.long_prompt_column``.

    Checked while the trainer is built, before any tokenization: the options, the model's head
    (:func:`~.model_patch.head_temperature`: a logit scale becomes the kernel's temperature,
    soft-capping is refused) and the kernel settings (``head_kernel``).

    * Reference: with a reference-free loss type (simpo, orpo, cpo) no reference model is loaded,
      kept or run, and no pass over the policy's weights is made (a passed ``ref_model`` is
      released with a warning). For dpo/ipo without a ``ref_model``: PEFT models use the base
      with the adapter disabled; a full model built in memory (no path in
      ``config._name_or_path`` to reload it from) is copied, frozen, as the reference, and the
      log says so.
    * ``padding_free=True`` (``DPOConfig``'s field, which TRL's DPOTrainer ignores with a warning;
      honoured here) packs each step into one row: one policy forward and one reference forward
      per step (``max_packed_length`` caps the tokens per row, at the price of more forwards).
      The model's attention must keep packed sequences apart (``flash_attention_2`` on CUDA,
      ``sdpa``/``eager``); any other ``attn_implementation`` raises, and the dense-mask ones warn
      on CUDA.
    * Context parallelism (accelerate's ``ParallelismConfig(cp_size=N)`` with FSDP2, or Axolotl's
      ``context_parallel_size``): every row is split along its length over the group, the
      per-sequence sums are all-reduced and the gradient scaled for the engine's averaging (see
      :mod:`.context_parallel`), in training, evaluation and prediction alike. Not combined with
      ``padding_free`` or ``precompute_ref_log_probs``.
    * Mixed precision (``bf16``/``fp16``): every policy and reference forward runs under the
      autocast accelerate gives the model's own forward (:func:`forward_autocast`).
    * MoE policies: the router load-balancing loss is added as DPOTrainer adds it
      (``router_aux_loss_coef``), pooled over the step's policy tokens (:mod:`.moe`).

    Construction runs in named steps: :meth:`_check_setup` (everything known before loading),
    :meth:`_text_tokenizer`, :meth:`_build_collator`, :meth:`_plan_reference`,
    :meth:`_init_dpo_trainer` (DPOTrainer's own ``__init__``, and what this trainer decides
    differently) and :meth:`_check_prepared_models`.

    Overrides (each for one feature; everything else is DPOTrainer's):

    * ``_prepare_dataset``: tokenize the long-prompt column after TRL's own tokenization.
    * ``_set_signature_columns_if_needed``: keep the long and reference columns through
      ``remove_unused_columns``.
    * ``_precompute_ref_logps``: the long-input reference columns (TRL's computes two).
    * ``compute_loss``: the SoLoPO objective (TRL's DPO loss does not apply).
    * ``prediction_step`` / ``predict``: evaluation in the training step's context-parallel
      context, the loss without logits (none exist), the metrics returned.
    * ``_prepare_context_parallel_inputs``: the trainer cuts its own slices (two batches of
      different lengths per step).
    """

    _tag_names = ["trl", "dpo", "solopo"]
    _name = "SoLoPO"
    _paper = _SOLOPO_PAPER
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
        peft_config = kwargs.get("peft_config")
        model_config = self._check_setup(model, ref_model, args, kwargs)
        processing_class = self._text_tokenizer(model, processing_class)
        data_collator = self._build_collator(data_collator, processing_class, args)
        ref_model = self._plan_reference(model, ref_model, args, model_config, peft_config)
        self._init_dpo_trainer(
            model,
            ref_model,
            args,
            data_collator,
            train_dataset,
            eval_dataset,
            processing_class,
            **kwargs,
        )
        self._check_prepared_models(args)

    # ------------------------------------------------------------------ construction steps
    def _check_setup(self, model: Any, ref_model: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """Everything that can be checked before anything is loaded or tokenized: the options
        (:func:`~.args.check_solopo_args`), the kernel settings, the model's head, the MoE
        auxiliary loss, Liger, PEFT with ZeRO-3 checkpointing and the parallel setups SoLoPO
        refuses (:func:`~.args.check_parallel_setup`). Keeps the options; returns the model's
        config (read without loading weights)."""
        if kwargs.get("compute_metrics") is not None:
            raise ValueError("compute_metrics: not supported, SoLoPOTrainer computes no logits")
        self._solopo = check_solopo_args(args)
        self._head_kernel = head_kernel(args)
        model_config = _model_config(model, args)
        head_temperature(model_config)  # a head the kernel cannot compute fails here, not at step 1
        self._moe_sizes = moe_sizes(model_config)
        self._aux_loss_coef = aux_loss_coefficient(model_config, args)
        check_liger(args, model, ref_model)
        self._check_peft_zero3_checkpointing(model, args, kwargs.get("peft_config"))
        check_parallel_setup(
            precompute=args.precompute_ref_log_probs,
            needs_reference=self._solopo.needs_reference,
            cp_size=_context_parallel_size(args),
            deepspeed=_deepspeed_requested(args),
            padding_free=args.padding_free,
        )
        return model_config

    @staticmethod
    def _text_tokenizer(model: Any, processing_class: Any) -> PreTrainedTokenizerBase:
        """The tokenizer the collator needs now (DPOTrainer would load the same one later)."""
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(
                model if isinstance(model, str) else model.config._name_or_path
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise ValueError(
                "processing_class: SoLoPOTrainer supports text tokenizers only (no vision processors)"
            )
        return processing_class

    def _build_collator(
        self, data_collator: Any, tokenizer: PreTrainedTokenizerBase, args: Any
    ) -> Any:
        """The default :class:`DataCollatorForSoLoPO` for these options, or the one given,
        checked against them (:func:`~.trl_data.check_collator`)."""
        if data_collator is None:
            return self._default_collator(tokenizer, args)
        if self._solopo.uses_long and not isinstance(data_collator, DataCollatorForSoLoPO):
            raise ValueError(
                f"data_collator: expected a DataCollatorForSoLoPO (it builds the long rows), got "
                f"{type(data_collator).__name__}; leave it None for the default"
            )
        check_collator(data_collator, self._solopo, padding_free=args.padding_free)
        return data_collator

    def _plan_reference(
        self, model: Any, ref_model: Any, args: Any, model_config: Any, peft_config: Any
    ) -> torch.nn.Module | None:
        """What DPOTrainer gets as ``ref_model``: a stand-in for a reference-free loss type (a
        passed reference is released), the one given, a frozen copy of an in-memory policy, or
        None where DPOTrainer finds the reference itself (see :meth:`_reference_copy`)."""
        if not self._solopo.needs_reference:
            if ref_model is not None:
                logger.warning(
                    "ref_model: not used by solopo_loss_type=%r (reference-free); released",
                    args.solopo_loss_type,
                )
            # (FSDP1 takes its auto-wrap policy from the first model it prepares, which is this
            # stand-in: create_accelerator_and_postprocess sets it from the policy first.)
            return _NoReference(model_config)
        if ref_model is None:
            return self._reference_copy(model, args, peft_config)
        return ref_model

    def _init_dpo_trainer(self, *positional: Any, **kwargs: Any) -> None:
        """``DPOTrainer.__init__`` (it loads the model, tokenizes, prepares the reference and
        precomputes through this trainer's hooks), then what it decides differently: packing
        stays on (the collator packs; its warning that it turns ``padding_free`` off is dropped),
        nothing is precomputed or kept for a reference-free type, and tokens are counted here."""
        args = positional[2]
        dpo_logger = logging.getLogger("trl.trainer.dpo_trainer")
        quiet = _DropPaddingFreeWarning()
        dpo_logger.addFilter(quiet)
        try:
            super().__init__(*positional, **kwargs)
        finally:
            dpo_logger.removeFilter(quiet)
        reference_free = not self._solopo.needs_reference
        self.padding_free = args.padding_free  # DPOTrainer set it False; the collator packs
        self.precompute_ref_logps = args.precompute_ref_log_probs and not reference_free
        if reference_free:
            self.ref_model = None  # the stand-in is never run
        self._total_tokens = 0

    def _check_prepared_models(self, args: Any) -> None:
        """What can only be checked on the models DPOTrainer built: PEFT (no prompt learning,
        no adapter on the head the kernel reads), packing (attention that keeps the sequences
        apart; a collator that packs), the parallel setup the accelerator ended up with; and
        the models readied for accelerate's context parallelism."""
        if (
            _is_peft(self.model)
            and self.model.peft_config[self.model.active_adapter].is_prompt_learning
        ):
            raise ValueError(
                "peft_config: prompt-learning PEFT methods are not supported (they shift the positions)"
            )
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if _is_peft(self.model) and any(
            hasattr(head, name) for name in ("base_layer", "original_module", "modules_to_save")
        ):
            # The fused kernel reads lm_head.weight: an adapter or trainable copy around the head
            # would be silently skipped (wrong log-probs, no gradient for it).
            raise ValueError(
                f"peft_config: an adapter on lm_head ({type(head).__name__}) is not supported: the "
                "fused log-prob kernel reads lm_head.weight; leave lm_head out of target_modules and "
                "modules_to_save"
            )
        if args.padding_free:
            for packed_model in (self.model, self.ref_model):
                if packed_model is not None:
                    check_packing_attention(packed_model)
                    warn_dense_packing(packed_model, self.args.device, args.max_packed_length)
            if not getattr(self.data_collator, "padding_free", False):
                raise ValueError(
                    "padding_free: the data_collator does not pack; pass a DataCollatorForSoLoPO with "
                    "padding_free=True, or leave data_collator None"
                )
        self._check_parallel_setup(precompute=False, padding_free=args.padding_free)
        if self._context_parallel_engine == "accelerate" and accelerate_plan(self.accelerator):
            prepare_torch_models(self.model, self.ref_model)

    def _check_parallel_setup(self, *, precompute: bool, padding_free: bool) -> None:
        """:func:`~.args.check_parallel_setup` on what the accelerator runs (a DeepSpeed launch or
        a context-parallel group the arguments did not show)."""
        config = getattr(self.accelerator, "parallelism_config", None)
        cp_size = int(config.cp_size) if getattr(config, "cp_enabled", False) else 1
        check_parallel_setup(
            precompute=precompute,
            needs_reference=self._solopo.needs_reference,
            cp_size=cp_size,
            deepspeed=self.is_deepspeed_enabled,
            padding_free=padding_free,
        )

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's hook, extended: under FSDP1 the auto-wrap policy comes from the policy model.

        Why: FSDP1 fixes its auto-wrap policy from the first model it prepares, and DPOTrainer
        prepares the reference first; for a reference-free type that is the layer-less stand-in,
        which would leave the policy's decoder layers unwrapped (one FSDP unit for the model).
        """
        super().create_accelerator_and_postprocess()
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1:
            plugin.set_auto_wrap_policy(self.model)  # the policy: Trainer set self.model already

    def _check_peft_zero3_checkpointing(self, model: Any, args: Any, peft_config: Any) -> None:
        """DPOTrainer forces reentrant gradient checkpointing for PEFT under DeepSpeed ZeRO-3, and
        reentrant checkpointing breaks several policy forwards per step (DeepSpeed asserts while
        it reduces the gradients). One forward per step (packing, no cap; or alpha = 0) is fine."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        peft = peft_config is not None or (not isinstance(model, str) and _is_peft(model))
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
            or _is_peft(model)
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
        # DPOTrainer's hook: the long-prompt column is tokenized after TRL's own tokenization.
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
        # Trainer's hook: without it remove_unused_columns drops the long and reference columns.
        super()._set_signature_columns_if_needed()
        for name in (LONG_PROMPT_IDS, LONG_PROMPT_LAYOUT, *REF_COLUMNS):
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    # --------------------------------------------------------------- forward
    def _long_rows_in_batch(self) -> int:
        """Long rows per pair in a collated batch: 0 with alpha = 0, 2 for ``"both"``, else 1."""
        options = self._solopo
        return options.long_rows_per_pair if options.uses_long else 0

    def _step_logps(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        *,
        with_long: bool,
        router: bool = False,
    ) -> SequenceLogps:
        """Per-sequence sums and counts of the short rows and, ``with_long``, of the long rows,
        computed inside ``model``'s forward: two forwards for a padded batch (short, then long),
        one per packed row for a packed batch (one in all without ``max_packed_length``), two
        context-parallel slices under context parallelism. ``router``: an MoE model also returns
        the router sums of every forward, added up (:mod:`.moe`); otherwise an MoE model is told
        not to compute its router logits."""
        patch_solopo_forward(self.accelerator.unwrap_model(model), self._head_kernel)
        extra = {} if self._moe_sizes is None else {"output_router_logits": router}
        with forward_autocast(self.accelerator):
            if is_packed(inputs):
                return self._packed_logps(model, inputs, with_long=with_long, extra=extra)
            plan = self._cp_plan
            run = (
                self._padded_logps if plan is None else functools.partial(self._sliced_logps, plan)
            )
            short = run(model, inputs, SHORT_KEYS, extra)
            long = run(model, inputs, LONG_KEYS, extra) if with_long else None
        return SequenceLogps(
            short.logps,
            short.lengths,
            long.logps if long is not None else None,
            long.lengths if long is not None else None,
            _add_loads(short.router_load, long.router_load if long is not None else None),
        )

    # -------------------------------------------------------- context parallelism
    @functools.cached_property
    def _cp_plan(self) -> ContextParallelPlan | None:
        """The context-parallel plan, resolved on first use (engines register their group after
        the trainer is built) and kept; None without context parallelism."""
        return self._context_parallel_plan()

    def _context_parallel_plan(self) -> ContextParallelPlan | None:
        """Where the plan comes from: accelerate's ``parallelism_config`` here; the Axolotl
        trainer overrides it with Axolotl's context-parallel group."""
        return accelerate_plan(self.accelerator)

    def _context_parallel_context(self, plan: ContextParallelPlan) -> Any:
        """A factory of the context every step's forwards (and backward) run in when this trainer
        cuts the slices: accelerate's context-parallel context (ring attention; see
        :func:`.context_parallel.torch_context`)."""
        if accelerate_plan(self.accelerator) is None:
            return contextlib.nullcontext
        return torch_context(self.accelerator, plan)

    def _prepare_context_parallel_inputs(self, model: Any, inputs: dict[str, Any]) -> tuple:
        # Trainer's hook around a training step (and, through prediction_step, an eval step): the
        # slices are cut by this trainer, so only the context is returned, the inputs unchanged.
        plan = self._cp_plan
        if plan is None or not plan.shard_inputs:
            return contextlib.nullcontext, inputs
        return self._context_parallel_context(plan), inputs

    def _sliced_logps(
        self,
        plan: ContextParallelPlan,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        keys: tuple[str, str, str],
        extra: dict[str, Any],
    ) -> SoLoPOLogProbsOutput:
        """This rank's *partial* ``(rows,)`` sums and counts of one padded batch, split along the
        rows' length over ``plan.group`` (all-reduced later, in the loss)."""
        input_ids, attention_mask, completion_mask = (inputs[key] for key in keys)
        pad_token_id = getattr(self.data_collator, "pad_token_id", 0) or 0
        token_mask = attention_mask if extra.get("output_router_logits") else None
        kwargs = model_inputs(
            plan, input_ids, completion_mask, pad_token_id=pad_token_id, token_mask=token_mask
        )
        return model(**kwargs, solopo_logps=True, use_cache=False, **extra)

    @staticmethod
    def _padded_logps(
        model: torch.nn.Module,
        inputs: dict[str, Any],
        keys: tuple[str, str, str],
        extra: dict[str, Any],
    ) -> SoLoPOLogProbsOutput:
        """``(rows,)`` sums and counts of one padded batch (``keys``: ids, attention, completion)."""
        input_ids, attention_mask, completion_mask = (inputs[key] for key in keys)
        labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            solopo_labels=labels,
            use_cache=False,
            **extra,
        )

    def _packed_logps(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        *,
        with_long: bool,
        extra: dict[str, Any],
    ) -> SequenceLogps:
        """The packed rows of ``inputs``, one forward each (only their short prefix when the long
        sequences are not needed), summed per sequence and split into short and long. Each
        forward gets the row's sequence boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``), so
        the flash-attention varlen kernels need not derive them from the positions in every
        layer."""
        n_sequences = count_sequences(inputs)
        long_rows = self._long_rows_in_batch()
        n_pairs = inputs.get(PACKED_PAIRS, n_sequences // (2 + long_rows))
        if n_sequences != (2 + long_rows) * n_pairs:
            raise ValueError(
                f"data_collator: the packed batch holds n_sequences={n_sequences} for n_pairs="
                f"{n_pairs}, expected (2 + {long_rows}) * n_pairs = {(2 + long_rows) * n_pairs} "
                f"(2 short and {long_rows} long per pair for solopo_alpha={self._solopo.alpha}, "
                f"solopo_ra_target={self._solopo.ra_target!r}); build the collator with the "
                "trainer's options, or leave data_collator None"
            )
        wanted = n_sequences if with_long else 2 * n_pairs
        sums = counts = load = None
        for pack in iter_packs(inputs, sequences=wanted):
            labels = pack.input_ids.masked_fill(pack.completion_mask == 0, IGNORE_INDEX)
            out = model(
                input_ids=pack.input_ids,
                position_ids=pack.position_ids,
                cu_seq_lens_q=pack.cu_seq_lens,
                cu_seq_lens_k=pack.cu_seq_lens,
                max_length_q=pack.max_length,
                max_length_k=pack.max_length,
                solopo_labels=labels,
                solopo_sequence_ids=pack.sequence_ids,
                use_cache=False,
                **extra,
            )
            # Per-row results have one entry per sequence id up to the row's last; a sequence lies
            # in one row, so adding the rows (zeros elsewhere) is exact.
            logps = F.pad(out.logps, (0, wanted - out.logps.shape[0]))
            lengths = F.pad(out.lengths, (0, wanted - out.lengths.shape[0]))
            sums = logps if sums is None else sums + logps
            counts = lengths if counts is None else counts + lengths
            load = _add_loads(load, out.router_load)
        short = 2 * n_pairs
        if not with_long:
            return SequenceLogps(sums, counts, router_load=load)
        return SequenceLogps(sums[:short], counts[:short], sums[short:], counts[short:], load)

    @contextlib.contextmanager
    def _reference_mode(self) -> Iterator[None]:
        """No grad, no checkpointing and, for PEFT without a reference model, the adapter off."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and _is_peft(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(
                unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
            )
        with (
            torch.no_grad(),
            _checkpointing_off(self.model, self.args.gradient_checkpointing_kwargs),
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
        # DPOTrainer's hook: TRL's precompute returns two columns; SoLoPO needs the long ones too.
        if not self._solopo.needs_reference:
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs: not supported with an IterableDataset")
        self._check_reference_available("evaluate")
        # A DeepSpeed launch or a context-parallel group (an engine's: evaluate(dataset) under
        # Axolotl's) that the arguments did not show.
        self._check_parallel_setup(precompute=True, padding_free=False)
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

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        # Trainer's hook: the SoLoPO objective replaces DPOTrainer's loss (the loss is a per-batch
        # mean, scaled for gradient accumulation by Trainer, as DPOTrainer's is).
        if return_outputs:
            raise ValueError(
                "return_outputs: SoLoPOTrainer computes no logits (use prediction_loss_only)"
            )
        mode = "train" if self.model.training else "eval"
        options = self._solopo
        plan = self._cp_plan
        aux_coef = self._aux_loss_coef
        step = self._step_logps(model, inputs, with_long=options.uses_long, router=aux_coef != 0)
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
            options=options,
        )
        metrics = {
            "preference_loss": out.preference_loss.detach(),
            "alignment_loss": out.alignment_loss.detach(),
            **out.metrics,
        }
        loss = out.loss
        if aux_coef:  # an MoE policy: the router load-balancing loss, as DPOTrainer adds it
            load = step.router_load
            if plan is not None:  # partial sums of this rank's slices, like the log-prob sums
                load = RouterLoad(*(sum_over_group(t, plan.group) for t in vars(load).values()))
            aux_loss = load.loss()
            loss = loss + aux_coef * aux_loss
            metrics["aux_loss"] = aux_loss.detach()
        self._log_metrics(mode, metrics, _count_tokens(inputs))
        if plan is not None:  # the engine averages the ranks' partial gradients: make it a sum
            return scale_gradient(loss, plan.gradient_scale)
        return loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        # Trainer's hook for evaluate()/predict(): the loss in the same context-parallel context as
        # a training step (DPOTrainer's runs none, and asks for logits, which this trainer never
        # computes). Returns (loss, None, None) whatever prediction_loss_only says.
        inputs = self._prepare_inputs(inputs)
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), cp_context():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
    ) -> Any:
        """Trainer's ``predict``: ``predictions`` and ``label_ids`` are None (no logits exist);
        ``metrics`` holds ``{prefix}_loss`` and the loss metrics (``{prefix}_rewards/chosen``,
        ``{prefix}_preference_loss``, ...), averaged over the dataset."""
        first = next(iter(test_dataset), {})
        if self.precompute_ref_logps and "ref_chosen_logps" not in first:
            self._check_reference_available("predict")  # before any tokenization
        # Prepared like evaluate() prepares a dataset passed to it (Trainer.predict does not).
        if first and "prompt_ids" not in first:
            test_dataset = self._prepare_dataset(
                test_dataset, self.processing_class, self.args, metric_key_prefix
            )
        if self.precompute_ref_logps and "ref_chosen_logps" not in next(iter(test_dataset), {}):
            batch = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            test_dataset = self._precompute_ref_logps(test_dataset, metric_key_prefix, batch)
        output = super().predict(test_dataset, ignore_keys, metric_key_prefix)
        collected = self._metrics["eval"]
        output.metrics.update(
            {f"{metric_key_prefix}_{k}": sum(v) / len(v) for k, v in collected.items() if v}
        )
        collected.clear()
        return output

    def _check_reference_available(self, method: str) -> None:
        """DPOTrainer's rule for a dataset passed to ``evaluate()``, applied to every reference pass
        (``evaluate()``, ``predict()``): with ``precompute_ref_log_probs`` and neither a reference
        model nor PEFT (whose base is the reference), the reference is the policy as it was when
        the trainer was built, gone once training has started. Scoring a new dataset against the
        trained policy would give every reward 0 and the loss log 2 (dpo), so it raises with
        TRL's message. Datasets given to the trainer when it was built keep the reference
        log-probs computed then (``evaluate()`` without a dataset, ``predict(trainer.eval_dataset)``)."""
        if self.ref_model is not None or _is_peft(self.model) or self.state.global_step == 0:
            return
        raise ValueError(
            f"Cannot compute reference log-probs for a dataset passed to `{method}()` after training "
            "has started, because `precompute_ref_log_probs=True` and no `ref_model` was provided "
            "(full fine-tuning). In this setup the reference model is not kept in memory, so it is "
            "only available before training. Provide this dataset as `eval_dataset` at "
            "initialization, pass an explicit `ref_model`, or set `precompute_ref_log_probs=False`."
        )

    def _log_metrics(
        self, mode: str, metrics: dict[str, torch.Tensor], tokens: torch.Tensor
    ) -> None:
        """Batch means of the loss metrics (docs/objective.md) averaged over processes, and
        ``num_tokens``, with one gather for all: in training the tokens of the training batches
        so far (like DPOTrainer's), in evaluation the tokens of this evaluation's batches (the
        eval metrics are cleared when an evaluation is logged, which restarts the count;
        DPOTrainer logs the training count as ``eval_num_tokens``)."""
        names = list(metrics)
        values = torch.stack([metrics[k].float() for k in names] + [tokens.float()]).unsqueeze(0)
        gathered = self.accelerator.gather(values)
        means = gathered[:, :-1].mean(0).tolist()
        for key, value in zip(names, means, strict=True):
            self._metrics[mode][key].append(value)
        # The ranks of a context- or tensor-parallel group hold the same batch: count it once.
        plan = self._cp_plan
        replicas = (plan.size if plan is not None else 1) * _tensor_parallel_size(self)
        batch_tokens = int(gathered[:, -1].sum().item()) // replicas
        if mode == "train":
            self._total_tokens += batch_tokens
            self._metrics[mode]["num_tokens"] = [self._total_tokens]
        else:
            so_far = self._metrics[mode].get("num_tokens") or [0]
            self._metrics[mode]["num_tokens"] = [so_far[-1] + batch_tokens]


@contextlib.contextmanager
def _checkpointing_off(model: Any, checkpointing_kwargs: dict | None) -> Iterator[None]:
    """Activation checkpointing off for a no-grad forward (the reference), back on afterwards:
    TRL's ``disable_gradient_checkpointing``, minus its FutureWarning. transformers 5.25 renamed
    the methods (``is_gradient_checkpointing`` -> ``is_activation_checkpointing``, ...) and warns on
    every use of the old names, which TRL reads at every call, checkpointing on or not; the new
    names are used where they exist (transformers 5.20 has only the old ones)."""
    new_names = hasattr(type(_unwrap_peft(model)), "is_activation_checkpointing")
    enabled = model.is_activation_checkpointing if new_names else model.is_gradient_checkpointing
    if not enabled:
        yield
        return
    if new_names:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    try:
        yield
    finally:
        if new_names:
            model.activation_checkpointing_enable(checkpointing_kwargs)
        else:
            model.gradient_checkpointing_enable(checkpointing_kwargs)


def _is_peft(model: Any) -> bool:
    """Whether ``model`` is a PEFT model. accelerate's ``is_peft_model`` first unwraps DDP and
    DeepSpeed engines, importing DeepSpeed wherever it is installed (on a host without CUDA it then
    logs "Setting accelerator to CPU"); the models asked about here are never wrapped (what the
    user passed, or the trainer's ``self.model``), so this one only checks the type."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _unwrap_peft(model: Any) -> Any:
    """The transformers model under a PEFT model (whose wrappers forward attribute reads to it)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def forward_autocast(accelerator: Any) -> contextlib.AbstractContextManager:
    """The autocast that accelerate puts around a prepared model's own ``forward``, to enter
    around the SoLoPO forwards (policy and reference), which do not pass through it.

    Why: with native mixed precision (``bf16=True``/``fp16=True`` on one device, DDP, FSDP1,
    multi-CPU) accelerate wraps each model's ``forward`` in ``torch.autocast`` when it prepares
    the model; the patched forward (:mod:`.model_patch`) replaces that instance attribute and runs
    the backbone and the head itself, so without this context the backbone would run in float32.
    The context is accelerate's own (``Accelerator.autocast``: its dtype and ``AutocastKwargs``).
    None where accelerate wraps no forward: DeepSpeed (its engine casts the weights to bf16/fp16,
    ``native_amp`` is off) and FSDP2 (``MixedPrecisionPolicy`` gathers the parameters in the
    compute dtype); their mixed precision reaches the patched forward through the weights.
    """
    if not getattr(accelerator, "native_amp", False) or getattr(accelerator, "is_fsdp2", False):
        return contextlib.nullcontext()
    return accelerator.autocast()


def _add_loads(a: RouterLoad | None, b: RouterLoad | None) -> RouterLoad | None:
    """The router sums of two sets of forwards (either may be None)."""
    if a is None or b is None:
        return a if b is None else b
    return a + b


def _count_tokens(inputs: dict[str, Any]) -> torch.Tensor:
    """Tokens the model ran on in one step (short and long rows, padding excluded)."""
    if is_packed(inputs):
        return (inputs[PACKED_SEQUENCE_IDS] >= 0).sum()
    total = inputs["attention_mask"].sum()
    if LONG_KEYS[1] in inputs:
        total = total + inputs[LONG_KEYS[1]].sum()
    return total


def _tensor_parallel_size(trainer: Any) -> int:
    config = getattr(trainer.accelerator, "parallelism_config", None)
    return int(getattr(config, "tp_size", 1) or 1) if config is not None else 1
