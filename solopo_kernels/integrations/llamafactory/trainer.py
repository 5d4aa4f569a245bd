"""LLaMA-Factory's DPO trainer with the fused log-prob head and the SoLo-RA term.

:class:`SoLoPODPOTrainer` is LLaMA-Factory's ``CustomDPOTrainer`` with three overrides:

* ``concatenated_forward``: per-sequence log-prob sums from this package's kernel, computed inside
  the (wrapped) model's forward by the per-instance patch of :mod:`..model_patch`, instead of
  ``model(**batch).logits.to(float32)`` and ``get_batch_logps``. It returns what LLaMA-Factory's
  returns (sums, or means for ipo/orpo/simpo), and in place of the ``[B, T, V]`` logits their mean
  as a scalar (``logits/chosen`` is that mean; it needs no logits, see ``solopo_logit_sums``).
  Everything downstream (the preference loss, ``pref_ftx``, ``pref_bco_weight``, label smoothing,
  the metrics) is LLaMA-Factory's own code, so with ``solopo_alpha: 0`` the loss and the metrics
  are LLaMA-Factory's, from log-probs computed without logits.
* ``get_batch_loss_metrics``: LLaMA-Factory's on the short pair, plus ``solopo_alpha`` x SoLo-RA
  (:func:`solopo_kernels.solopo_loss`'s ``alignment_loss``) on the long rows.
* ``compute_reference_log_probs``: the precomputed reference sums when
  ``solopo_precompute_ref_log_probs`` put them in the batch, LLaMA-Factory's otherwise.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...losses import solopo_loss
from ..model_patch import IGNORE_INDEX, head_temperature, patch_solopo_forward
from .args import AVERAGED_LOSS_TYPES, SoLoPOLlamaFactoryArguments, loss_options
from .data import LONG_BATCH_KEYS, REF_COLUMNS, SoLoPODataCollator

try:
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
except (ImportError, RuntimeError) as error:
    # With transformers 5, TRL 0.24's checks for optional packages (mergekit, llm_blender, ...)
    # read a tuple and are always true; LLaMA-Factory corrects transformers' check when it is
    # imported (llamafactory.extras.packages). If TRL was imported first, its checks were made
    # before that, and `from trl import DPOTrainer` imports packages that are not installed.
    if "trl.import_utils" not in sys.modules or "No module named" not in str(error):
        raise
    raise ImportError(
        "LLaMA-Factory's DPO trainer cannot be imported: trl was imported before llamafactory, so "
        f"TRL 0.24 now imports optional packages that are not installed ({error}). Import "
        "llamafactory (or solopo_kernels.integrations.llamafactory) before trl, or run "
        "`python -m solopo_kernels.integrations.llamafactory train CONFIG.yaml`."
    ) from error

# Batch keys that are not model inputs.
_NOT_MODEL_INPUTS = ("labels", *LONG_BATCH_KEYS, *REF_COLUMNS)


class SoLoPODPOTrainer(CustomDPOTrainer):
    """``CustomDPOTrainer`` (LLaMA-Factory 0.9.5) whose log-probs come from the fused kernel.

    Arguments are ``CustomDPOTrainer``'s plus ``solopo`` (the ``solopo_*`` YAML keys). Checked here,
    before the first step: the options against LLaMA-Factory's (:func:`.args.loss_options`) and
    the model's head (a logit scale becomes the kernel's temperature; soft-capping raises).
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any,
        finetuning_args: Any,
        processor: Any,
        *args: Any,
        solopo: SoLoPOLlamaFactoryArguments,
        **kwargs: Any,
    ) -> None:
        self.solopo = solopo
        self.solopo_options = loss_options(solopo, finetuning_args)
        head_temperature(model.config)  # a head the kernel cannot compute fails before training
        kernel = solopo.head_kernel
        patch_solopo_forward(model, kernel)
        if ref_model is not None:
            patch_solopo_forward(ref_model, kernel)
        collator = kwargs.get("data_collator")
        kwargs["data_collator"] = SoLoPODataCollator(
            collator, solopo.long_rows if solopo.uses_long else ()
        )
        self._step_logps: dict[str, dict[str, torch.Tensor]] = {}
        self._precomputed = False
        super().__init__(model, ref_model, finetuning_args, processor, *args, **kwargs)
        if solopo.solopo_precompute_ref_log_probs and self.is_deepspeed_enabled:
            raise ValueError(
                "solopo_precompute_ref_log_probs: not supported under DeepSpeed (the reference pass "
                "runs before DeepSpeed wraps the policy); remove the key"
            )

    # ------------------------------------------------------------------ log-probs
    def concatenated_forward(
        self, model: Any, batch: dict[str, torch.Tensor], is_ref_model: bool = False
    ) -> dict[str, torch.Tensor]:
        """LLaMA-Factory's ``concatenated_forward`` on the fused head: the same keys and values,
        except ``chosen_logits`` / ``rejected_logits``, which are the mean logit (a scalar) instead
        of the ``[B, T, V]`` logits (LLaMA-Factory only logs their mean)."""
        inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
        labels = batch["labels"]
        out = model(**inputs, solopo_labels=labels, solopo_logit_sums=True, use_cache=False)
        sums, lengths = out.logps, out.lengths
        self._step_logps["reference" if is_ref_model else "policy"] = {
            "sums": sums,
            "lengths": lengths,
        }
        all_logps = sums / lengths if self.loss_type in AVERAGED_LOSS_TYPES else sums
        batch_size = labels.shape[0] // 2
        chosen_logps, rejected_logps = all_logps.split(batch_size, dim=0)
        chosen_length = lengths[:batch_size]
        vocab = model_vocab(model)
        per_row = labels.shape[1] * vocab * batch_size  # elements of one side's [B, T, V] logits
        chosen_logits, rejected_logits = (
            s.sum() / per_row for s in out.logit_sums.split(batch_size)
        )
        return {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_logits": chosen_logits,
            "rejected_logits": rejected_logits,
            "chosen_logps_avg": (
                chosen_logps
                if self.loss_type in AVERAGED_LOSS_TYPES
                else chosen_logps / chosen_length
            ),
        }

    def compute_reference_log_probs(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """LLaMA-Factory's (the reference model, or the adapter disabled), or the precomputed sums
        of the batch, in LLaMA-Factory's convention (means for ipo/orpo/simpo)."""
        if not self.finetuning_args.use_ref_model:
            return None, None
        if "ref_chosen_logps" not in batch:
            if self._precomputed:
                raise ValueError(
                    "solopo_precompute_ref_log_probs: this batch has no precomputed reference "
                    "columns (a dataset passed to evaluate() after the reference was released?)"
                )
            return super().compute_reference_log_probs(model, batch)
        sums = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        self._step_logps["reference"] = {"sums": sums, "lengths": lengths}
        values = sums / lengths if self.loss_type in AVERAGED_LOSS_TYPES else sums
        return values.split(values.shape[0] // 2)

    def _long_logps(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R*B,)`` sums and counts of the long rows."""
        out = model(
            input_ids=batch["long_input_ids"],
            attention_mask=batch["long_attention_mask"],
            solopo_labels=batch["long_labels"],
            use_cache=False,
        )
        return out.logps, out.lengths

    def _reference_long_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_long_chosen_logps" in batch:
            names = ("ref_long_chosen_logps", "ref_long_rejected_logps")[
                : len(self.solopo.long_rows)
            ]
            return torch.cat([batch[name] for name in names])
        reference, context = self._reference_model(model)
        with torch.no_grad(), context:
            return self._long_logps(reference, batch)[0]

    def _reference_model(self, model: Any) -> tuple[Any, Any]:
        """The reference and the context to run it in, as LLaMA-Factory's
        ``compute_reference_log_probs`` picks them (no reference model: the adapter disabled)."""
        if self.ref_model is None:
            return model, self.accelerator.unwrap_model(model).disable_adapter()
        return self.ref_model, nullcontext()

    # ------------------------------------------------------------------ loss
    def get_batch_loss_metrics(
        self, model: Any, batch: dict[str, torch.Tensor], train_eval: str = "train"
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """LLaMA-Factory's loss and metrics on the short pair, plus ``solopo_alpha`` x SoLo-RA and
        its metrics (``solo_ra/alignment_loss``, ``solo_ra/distance``, ``logps/long_chosen``)."""
        self._step_logps = {}
        loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
        options = self.solopo_options
        if not options.uses_long:
            return loss, metrics
        policy = self._step_logps["policy"]
        long_sums, long_lengths = self._long_logps(model, batch)
        ref_short = ref_long = None
        if options.needs_reference:
            ref_short = self._step_logps["reference"]["sums"]
            if options.needs_long_reference:
                ref_long = self._reference_long_logps(model, batch)
        out = solopo_loss(
            policy["sums"],
            policy["lengths"],
            long_sums,
            long_lengths,
            ref_short_logps=ref_short,
            ref_long_logps=ref_long,
            **options.as_kwargs(),
        )
        prefix = "eval_" if train_eval == "eval" else ""
        n_pairs = policy["sums"].shape[0] // 2
        long_chosen = long_sums[:n_pairs]
        if self.loss_type in AVERAGED_LOSS_TYPES:  # the convention of LLaMA-Factory's logps/chosen
            long_chosen = long_chosen / long_lengths[:n_pairs]
        metrics[f"{prefix}solo_ra/alignment_loss"] = out.alignment_loss.item()
        metrics[f"{prefix}solo_ra/distance"] = out.metrics["solo_ra/distance"].item()
        metrics[f"{prefix}logps/long_chosen"] = long_chosen.detach().mean().item()
        return loss + options.alpha * out.alignment_loss.to(loss.dtype), metrics

    # ------------------------------------------------------------------ precomputed reference
    def get_train_dataloader(self) -> DataLoader:
        if self.solopo.solopo_precompute_ref_log_probs and not self._precomputed:
            self._precompute_references()
        return super().get_train_dataloader()

    def _precompute_references(self) -> None:
        """Score the train and eval datasets with the reference once, add the ``ref_*`` columns
        (sums), then release a separate reference model."""
        self.train_dataset = self._with_reference_columns(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                name: self._with_reference_columns(dataset, f"eval {name}")
                for name, dataset in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self._with_reference_columns(self.eval_dataset, "eval")
        self._precomputed = True
        # Every batch now carries its reference sums: a separate reference model is not needed
        # again (with LoRA and no ref_model there is none; the adapter was disabled instead).
        # Its weights are freed in place (moved to the meta device): run_dpo's own variable still
        # refers to the module for the whole training, so dropping this reference alone would
        # free nothing.
        if self.ref_model is not None and self.ref_model is not self.model:
            self.ref_model.to("meta")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.ref_model = None

    def _with_reference_columns(self, dataset: Any, name: str) -> Any:
        if not hasattr(dataset, "add_column"):
            raise ValueError(
                f"solopo_precompute_ref_log_probs: the {name} dataset is streamed (no add_column); "
                "remove the key or set streaming: false"
            )
        loader = self.accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                shuffle=False,
            )
        )
        columns: dict[str, list[torch.Tensor]] = {}
        long_reference = self.solopo_options.needs_long_reference
        for batch in tqdm(
            loader, desc=f"Reference log-probs ({name})", disable=not self.is_local_process_zero()
        ):
            self._step_logps = {}
            with torch.no_grad():
                super().compute_reference_log_probs(self.model, batch)
            sums = self._step_logps["reference"]["sums"]
            refs = dict(zip(("ref_chosen_logps", "ref_rejected_logps"), sums.chunk(2)))
            if long_reference:
                long = self._reference_long_logps(self.model, batch).chunk(
                    len(self.solopo.long_rows)
                )
                refs.update(zip(("ref_long_chosen_logps", "ref_long_rejected_logps"), long))
            for key, value in self.accelerator.gather_for_metrics(refs).items():
                columns.setdefault(key, []).append(value.float().cpu())
        for key, parts in columns.items():
            if key in dataset.column_names:
                dataset = dataset.remove_columns(key)
            dataset = dataset.add_column(key, torch.cat(parts).tolist())
        return dataset


def model_vocab(model: Any) -> int:
    """The lm_head's output size of a (possibly wrapped) model (``out_features``: a ZeRO-3
    partitioned weight has no rows to count)."""
    head = getattr(model, "module", model).get_output_embeddings()
    return getattr(head, "out_features", None) or head.weight.shape[0]
