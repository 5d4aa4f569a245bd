"""The ``solopo_*`` keys of a LLaMA-Factory YAML file, and the rules that tie them to LLaMA-Factory's
own options.

LLaMA-Factory parses its YAML with ``HfArgumentParser`` into fixed dataclasses and rejects unknown
keys, so the launcher takes the ``solopo_*`` keys out before LLaMA-Factory sees the rest
(:func:`split_solopo_args`). The rules that need LLaMA-Factory's parsed options
(``pref_loss``, ``pref_beta``, ...) are checked when the trainer is built
(:func:`loss_options`); the ones that need the raw keys (stage, gradient checkpointing), here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from ...losses import RA_DISTANCES, RA_GRADIENTS, RA_TARGETS, SoLoPOOptions
from ..args import HeadKernel

# LLaMA-Factory's pref_loss -> the reward and loss type of solopo_kernels' SoLo-RA term.
SOLOPO_LOSS_TYPES = {"sigmoid": "dpo", "ipo": "ipo", "simpo": "simpo", "orpo": "orpo"}
# pref_loss types LLaMA-Factory averages the log-probs for (concatenated_forward).
AVERAGED_LOSS_TYPES = ("ipo", "orpo", "simpo")
PREFIX = "solopo_"


@dataclass
class SoLoPOLlamaFactoryArguments:
    """The ``solopo_*`` YAML keys. Every other key is LLaMA-Factory's and keeps its meaning
    (``pref_loss``, ``pref_beta``, ``simpo_gamma``, ``pref_ftx``, ``cutoff_len``, ...).

    Attributes:
        solopo_alpha: weight of the SoLo-RA term. 0 (the default) trains LLaMA-Factory's own
            loss with the memory-bounded log-prob head only (no long prompt needed).
        solopo_ra_target: ``"chosen"`` (the paper) aligns the chosen response; ``"both"`` also the
            rejected one (one more long forward per step).
        solopo_ra_distance: ``"abs"`` or ``"squared"``.
        solopo_ra_use_reference: sigmoid/ipo: keep the reference terms inside SoLo-RA
            (``False``: no reference forward on the long rows).
        solopo_ra_gradient: ``"both"`` (the paper's formula) or ``"long"`` (the short reward is a
            fixed target; see docs/objective.md).
        solopo_cutoff_long_len: at most this many tokens in a long row (prompt + response); the
            long *prompt* is cut from the left to fit. None: no limit.
        solopo_precompute_ref_log_probs: score every example with the reference once, before
            the first step, then release the reference model (sigmoid/ipo with a reference).
        solopo_head_kernel: the log-prob kernel's settings (a dict with ``backend``,
            ``chunk_size``, ``options``; see :class:`~solopo_kernels.integrations.args.HeadKernel`).
    """

    solopo_alpha: float = 0.0
    solopo_ra_target: str = "chosen"
    solopo_ra_distance: str = "abs"
    solopo_ra_use_reference: bool = True
    solopo_ra_gradient: str = "both"
    solopo_cutoff_long_len: int | None = None
    solopo_precompute_ref_log_probs: bool = False
    solopo_head_kernel: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        for name, choices in (
            ("solopo_ra_target", RA_TARGETS),
            ("solopo_ra_distance", RA_DISTANCES),
            ("solopo_ra_gradient", RA_GRADIENTS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")
        alpha = self.solopo_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"solopo_alpha: expected a number >= 0, got {alpha!r}")
        for name in ("solopo_ra_use_reference", "solopo_precompute_ref_log_probs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        cap = self.solopo_cutoff_long_len
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
            raise ValueError(
                f"solopo_cutoff_long_len: expected an integer >= 2 or null, got {cap!r}"
            )
        # A bad kernel setting fails here, before anything is loaded.
        HeadKernel.coerce(self.solopo_head_kernel, "solopo_head_kernel")

    @property
    def uses_long(self) -> bool:
        return self.solopo_alpha > 0

    @property
    def long_rows(self) -> tuple[str, ...]:
        """Which responses get a long row: ``("chosen",)`` or ``("chosen", "rejected")``."""
        return ("chosen", "rejected") if self.solopo_ra_target == "both" else ("chosen",)

    @property
    def head_kernel(self) -> HeadKernel:
        return HeadKernel.coerce(self.solopo_head_kernel, "solopo_head_kernel")


SOLOPO_KEYS = tuple(f.name for f in fields(SoLoPOLlamaFactoryArguments))


def split_solopo_args(
    args: dict[str, Any] | list[str],
) -> tuple[dict[str, Any] | list[str], SoLoPOLlamaFactoryArguments]:
    """LLaMA-Factory's arguments without the ``solopo_*`` keys, and those keys parsed.

    ``args`` is what LLaMA-Factory's ``read_args`` returns: a dict (a YAML or JSON file merged with
    ``key=value`` overrides) or a list of ``--key value`` / ``--key=value`` strings. A ``solopo_*``
    key that is not one of :data:`SOLOPO_KEYS` raises (a typo would otherwise reach
    LLaMA-Factory's parser as an unknown key, or be lost).
    """
    if isinstance(args, dict):
        solopo = {k: v for k, v in args.items() if k.startswith(PREFIX)}
        rest = {k: v for k, v in args.items() if not k.startswith(PREFIX)}
    else:
        solopo, rest, items = {}, [], list(args)
        while items:
            item = items.pop(0)
            if not item.startswith("--" + PREFIX):
                rest.append(item)
                continue
            key, sep, value = item[2:].partition("=")
            if not sep:
                if not items:
                    raise ValueError(f"{key}: expected a value after --{key}")
                value = items.pop(0)
            solopo[key] = _parse_cli_value(value)
    unknown = sorted(set(solopo) - set(SOLOPO_KEYS))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a solopo_kernels option (known: {list(SOLOPO_KEYS)})")
    return rest, SoLoPOLlamaFactoryArguments(**solopo)


def _parse_cli_value(value: str) -> Any:
    """A ``--solopo_x value`` string as YAML would read it (numbers, true/false, null, dicts)."""
    import yaml

    return yaml.safe_load(value)


def check_stage(lf_args: dict[str, Any] | list[str], solopo: SoLoPOLlamaFactoryArguments) -> None:
    """Refuse, before LLaMA-Factory loads anything, what the launcher cannot run.

    * ``stage`` other than ``dpo``: this launcher patches the DPO stage only; ``use_mca`` (the
      Megatron-Core DPO workflow) neither.
    * SoLoPO (``solopo_alpha > 0``) with reentrant gradient checkpointing in a distributed run
      (LLaMA-Factory's default ``use_reentrant_gc: true``): two policy forwards per step, which
      reentrant checkpointing breaks under DDP ("marked as ready twice").
    """
    values = args_as_dict(lf_args)
    stage = values.get("stage", "sft")
    if stage != "dpo":
        raise ValueError(
            f"stage: solopo_kernels' LLaMA-Factory launcher runs stage: dpo only, got {stage!r}; use "
            "llamafactory-cli for the other stages"
        )
    if _truthy(values.get("use_mca", False)):
        raise ValueError("use_mca: the Megatron-Core DPO path is not patched by solopo_kernels")
    reentrant = _truthy(values.get("use_reentrant_gc", True))
    checkpointing = not _truthy(values.get("disable_gradient_checkpointing", False))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if solopo.uses_long and checkpointing and reentrant and distributed:
        raise ValueError(
            "use_reentrant_gc: SoLoPO (solopo_alpha > 0) runs two policy forwards per step, which "
            "reentrant gradient checkpointing breaks in a distributed run ('marked as ready twice'); "
            "set use_reentrant_gc: false (or disable_gradient_checkpointing: true)"
        )


def args_as_dict(lf_args: dict[str, Any] | list[str]) -> dict[str, Any]:
    """The few keys :func:`check_stage` reads, from a dict or a ``--key value`` list."""
    if isinstance(lf_args, dict):
        return lf_args
    values: dict[str, Any] = {}
    items = list(lf_args)
    for i, item in enumerate(items):
        if not item.startswith("--"):
            continue
        key, sep, value = item[2:].partition("=")
        if not sep:
            following = items[i + 1] if i + 1 < len(items) else None
            value = (
                following if following is not None and not following.startswith("--") else "true"
            )
        values[key] = value
    return values


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def loss_options(solopo: SoLoPOLlamaFactoryArguments, finetuning_args: Any) -> SoLoPOOptions:
    """The :class:`~solopo_kernels.losses.SoLoPOOptions` of the SoLo-RA term, from the ``solopo_*``
    keys and LLaMA-Factory's parsed ``FinetuningArguments`` (``pref_loss``, ``pref_beta``,
    ``simpo_gamma``). Raises for what the fused head or SoLo-RA cannot compute.

    The preference loss itself stays LLaMA-Factory's (``pref_ftx``, ``pref_bco_weight`` and
    ``dpo_label_smoothing`` apply to it as usual); the options only define SoLo-RA's rewards.
    """
    if getattr(finetuning_args, "ld_alpha", None) is not None:
        raise ValueError(
            f"ld_alpha: LD-DPO's length-desensitized log-probs (ld_alpha={finetuning_args.ld_alpha}) "
            "need per-token log-probs, which the fused log-prob head does not return; remove ld_alpha "
            "or run llamafactory-cli without solopo_kernels"
        )
    pref_loss = finetuning_args.pref_loss
    if solopo.uses_long and pref_loss not in SOLOPO_LOSS_TYPES:
        raise ValueError(
            f"pref_loss: SoLoPO (solopo_alpha > 0) is defined for {sorted(SOLOPO_LOSS_TYPES)}, got "
            f"{pref_loss!r} (with solopo_alpha: 0 every pref_loss runs on the fused head)"
        )
    if solopo.solopo_precompute_ref_log_probs and not finetuning_args.use_ref_model:
        raise ValueError(
            f"solopo_precompute_ref_log_probs: pref_loss={pref_loss!r} uses no reference model; "
            "remove the key"
        )
    return SoLoPOOptions(
        loss_type=SOLOPO_LOSS_TYPES.get(pref_loss, "dpo"),
        beta=finetuning_args.pref_beta,
        alpha=float(solopo.solopo_alpha),
        gamma=finetuning_args.simpo_gamma,
        ra_target=solopo.solopo_ra_target,
        ra_distance=solopo.solopo_ra_distance,
        ra_use_reference=solopo.solopo_ra_use_reference,
        ra_gradient=solopo.solopo_ra_gradient,
    )
