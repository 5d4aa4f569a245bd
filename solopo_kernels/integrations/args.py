"""The SoLoPO training arguments, shared by the TRL config and the Axolotl training-args mixin.

Import-light (no TRL, no Axolotl): :class:`SoLoPOArguments` is a plain dataclass mixed into
``trl.DPOConfig`` by :class:`solopo_kernels.integrations.trl.SoLoPOConfig`, and into Axolotl's
training arguments by the Axolotl plugin.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..losses import SoLoPOOptions
from ..ops.logprobs import BACKENDS, ChunkSize, check_chunk_size
from ..ops.tiles import KernelOptions


@dataclass(frozen=True)
class HeadKernel:
    """The log-prob kernel's settings as one value, from the trainer config to the kernel.

    The patched forward (:mod:`.model_patch`) passes them unchanged to the kernel as
    ``backend=``, ``chunk_size=`` and ``kernel_options=`` (see
    :func:`solopo_kernels.fused_linear_logprobs`); a new kernel knob is a field of
    :class:`~solopo_kernels.KernelOptions`, not a new trainer option.

    Attributes:
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"triton_tma"``.
        chunk_size: None (derived from H, V and the device), an int (tokens per tile) or a pair
            ``(tokens, vocabulary columns)``.
        options: the opt-in knobs, e.g. ``KernelOptions(saved_logits_bytes=2**30)``.
    """

    backend: str = "auto"
    chunk_size: ChunkSize = None
    options: KernelOptions = field(default_factory=KernelOptions)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"head_kernel.backend: expected one of {BACKENDS}, got {self.backend!r}"
            )
        try:
            check_chunk_size(self.chunk_size)
        except ValueError as error:
            raise ValueError(f"head_kernel.{error}") from None
        if not isinstance(self.options, KernelOptions):
            raise TypeError(
                f"head_kernel.options: expected a solopo_kernels.KernelOptions (or a dict of its "
                f"fields), got {type(self.options).__name__}"
            )

    @classmethod
    def coerce(cls, value: Any, name: str = "head_kernel") -> HeadKernel:
        """``value`` as a :class:`HeadKernel`: None (the defaults), a HeadKernel, a dict of its
        fields (``options`` a dict of KernelOptions' fields; a list ``chunk_size`` becomes a pair,
        as YAML gives it), or that dict as a JSON string (the command line). Errors name ``name``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{name}: expected a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise TypeError(
                f"{name}: expected a HeadKernel, a dict with keys backend/chunk_size/options, or None; "
                f"got {type(value).__name__}"
            )
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"{name}: unknown key {unknown[0]!r} (expected {sorted(allowed)})")
        kwargs = dict(value)
        if isinstance(kwargs.get("chunk_size"), list):
            kwargs["chunk_size"] = tuple(kwargs["chunk_size"])
        options = kwargs.get("options")
        if isinstance(options, dict):
            known = {f.name for f in fields(KernelOptions)}
            bad = sorted(set(options) - known)
            if bad:
                raise ValueError(
                    f"{name}.options: unknown key {bad[0]!r} (KernelOptions fields: {sorted(known)})"
                )
            kwargs["options"] = KernelOptions(**options)
        elif options is None:
            kwargs.pop("options", None)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace("head_kernel", name, 1)) from None

    def as_kwargs(self) -> dict[str, Any]:
        """The kernel's keyword arguments: ``backend``, ``chunk_size``, ``kernel_options``."""
        return {
            "backend": self.backend,
            "chunk_size": self.chunk_size,
            "kernel_options": self.options,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (what the config keeps, so that ``to_json_string`` works)."""
        chunk = list(self.chunk_size) if isinstance(self.chunk_size, tuple) else self.chunk_size
        return {
            "backend": self.backend,
            "chunk_size": chunk,
            "options": dataclasses.asdict(self.options),
        }


@dataclass
class SoLoPOArguments:
    """SoLoPO options on top of a ``DPOConfig`` (``beta`` and ``label_smoothing`` are DPOConfig's)."""

    solopo_alpha: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the SoLo-RA term; 0 trains plain short-context PO (no long-input work)."
        },
    )
    solopo_loss_type: str = field(
        default="dpo",
        metadata={"help": "Reward and preference loss: dpo, ipo, simpo, orpo or cpo."},
    )
    solopo_ra_target: str = field(
        default="chosen",
        metadata={
            "help": "'chosen' aligns the chosen response (paper default); 'both' also the rejected one."
        },
    )
    solopo_ra_distance: str = field(
        default="abs", metadata={"help": "SoLo-RA distance: 'abs' or 'squared'."}
    )
    solopo_ra_use_reference: bool = field(
        default=True,
        metadata={
            "help": "dpo/ipo: keep the reference terms inside SoLo-RA (False skips the long reference forward)."
        },
    )
    solopo_ra_gradient: str = field(
        default="both",
        metadata={
            "help": "'both' (paper): SoLo-RA's gradient reaches the short and the long reward; "
            "'long': the short reward is a fixed target, only the long side is pulled."
        },
    )
    solopo_nll_average: str = field(
        default="sequence",
        metadata={
            "help": "orpo/cpo: the NLL term's average, 'sequence' (the ORPO paper's: each chosen "
            "response's token mean, then the mean over pairs) or 'token' (all chosen response "
            "tokens of the batch, as TRL's CPOTrainer/ORPOTrainer)."
        },
    )
    long_prompt_column: str = field(
        default="long_prompt",
        metadata={
            "help": "Dataset column with the long-context prompt (same format rules as 'prompt')."
        },
    )
    max_long_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum long prompt+response length; a longer row loses tokens of its long "
            "context only (the template's start, the question and the short prompt's context stay)."
        },
    )
    gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})
    head_kernel: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "The log-prob kernel's settings as one value: a HeadKernel, or a dict (JSON on the "
            'command line) like {"backend": "auto", "chunk_size": null, "options": '
            '{"saved_logits_bytes": 0}}. None: the defaults.'
        },
    )
    max_packed_length: int | None = field(
        default=None,
        metadata={
            "help": "With padding_free: at most this many tokens per packed row (a step then runs one "
            "forward per row); a sequence longer than this gets a row of its own. None: one row per step."
        },
    )


SOLOPO_ARGUMENT_NAMES = tuple(f.name for f in fields(SoLoPOArguments))

# DPOConfig options that SoLoPO does not implement, with the only value it accepts.
_DPO_DEFAULTS: dict[str, Any] = {
    "loss_type": ["sigmoid"],
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "use_weighting": False,
    "truncation_mode": "keep_start",
}


@dataclass(frozen=True)
class SetupNames:
    """How a user wrote the options :func:`check_parallel_setup` names: TRL's training arguments
    (``name=value``) or Axolotl's YAML keys (``name: value``)."""

    precompute: str = "precompute_ref_log_probs"
    cp_size: str = "parallelism_config.cp_size"
    padding_free: str = "padding_free"
    deepspeed: str = "deepspeed"
    yaml: bool = False

    def set(self, name: str, value: Any) -> str:
        if self.yaml:
            return f"{name}: {str(value).lower() if isinstance(value, bool) else value}"
        return f"{name}={value!r}"


TRL_NAMES = SetupNames()
AXOLOTL_NAMES = SetupNames(
    cp_size="context_parallel_size", padding_free="dpo_padding_free", yaml=True
)


def check_parallel_setup(
    *,
    precompute: bool,
    needs_reference: bool,
    cp_size: int,
    deepspeed: bool,
    padding_free: bool,
    names: SetupNames = TRL_NAMES,
) -> None:
    """The setups SoLoPO refuses, in one place for the trainer (its arguments when it is built, the
    accelerator's state when it precomputes) and for the Axolotl plugin (its config): a
    ``ValueError`` naming the options as ``names`` spells them, and what to set instead.

    * precomputed reference log-probs (dpo/ipo) with context parallelism: DPOTrainer computes them
      while it is built, before the context-parallel setup, so every GPU would score full rows
      and the results would be gathered over all ranks, ``cp_size`` times too many;
    * precomputed reference log-probs under DeepSpeed: the reference pass runs before DeepSpeed
      wraps the policy, whose ZeRO-3 partitions cannot be read then;
    * packing with context parallelism: the engines' ring attention is causal over the whole row
      and would let the packed sequences see each other.
    """
    n = names
    if precompute and needs_reference and cp_size > 1:
        raise ValueError(
            f"{n.precompute}: not supported with context parallelism ({n.set(n.cp_size, cp_size)}): "
            "the reference pass would run on full rows on every GPU, before the context-parallel "
            f"setup; either set {n.set(n.precompute, False)} (the reference then runs in "
            f"context-parallel slices every step) or turn context parallelism off "
            f"({n.set(n.cp_size, 1)})"
        )
    if precompute and needs_reference and deepspeed:
        raise ValueError(
            f"{n.precompute}: not supported under DeepSpeed by SoLoPOTrainer (the policy is not "
            "wrapped by DeepSpeed yet when the reference pass runs, so its ZeRO-3 partitions cannot "
            f"be read); set {n.set(n.precompute, False)} (the reference then runs every step, "
            "partitioned like the policy)"
        )
    if padding_free and cp_size > 1:
        raise ValueError(
            f"{n.padding_free}: not supported with context parallelism ({n.set(n.cp_size, cp_size)}): "
            "the ring attention of the context-parallel engines is causal over the whole row and "
            f"would let packed sequences see each other; set {n.set(n.padding_free, False)}"
        )


def solopo_options(args: Any) -> SoLoPOOptions:
    """The validated :class:`~solopo_kernels.losses.SoLoPOOptions` of a config with the
    :class:`SoLoPOArguments` fields plus ``beta`` and ``label_smoothing``."""
    missing = [name for name in SOLOPO_ARGUMENT_NAMES if not hasattr(args, name)]
    if missing:
        raise TypeError(
            f"args: {type(args).__name__} has no {missing[0]!r}; pass a SoLoPOConfig (or a DPOConfig "
            "that mixes in SoLoPOArguments)"
        )
    return SoLoPOOptions(
        loss_type=args.solopo_loss_type,
        beta=args.beta,
        alpha=args.solopo_alpha,
        gamma=args.gamma,
        label_smoothing=args.label_smoothing,
        ra_target=args.solopo_ra_target,
        ra_distance=args.solopo_ra_distance,
        ra_use_reference=args.solopo_ra_use_reference,
        ra_gradient=args.solopo_ra_gradient,
        nll_average=getattr(args, "solopo_nll_average", "sequence"),
    )


def head_kernel(args: Any) -> HeadKernel:
    """The validated :class:`HeadKernel` of a config's ``head_kernel`` field (None: defaults)."""
    return HeadKernel.coerce(getattr(args, "head_kernel", None))


def check_solopo_args(args: Any) -> SoLoPOOptions:
    """Validate a DPOConfig carrying :class:`SoLoPOArguments`; returns its loss options.

    Raises ``ValueError`` for a DPO-only option SoLoPO would otherwise silently ignore
    (``loss_type``, ``loss_weights``, ``ld_alpha``, ``f_divergence_type``, ``use_weighting``),
    ``truncation_mode="keep_end"``, ``sync_ref_model`` with a reference-free loss, and
    reentrant gradient checkpointing (two policy forwards per step break it under DDP).
    """
    options = solopo_options(args)
    head_kernel(args)
    for name, default in _DPO_DEFAULTS.items():
        value = getattr(args, name, default)
        if value != default:
            raise ValueError(
                f"{name}: SoLoPO does not implement DPOConfig.{name}={value!r} (leave it at "
                f"{default!r}; choose the loss with solopo_loss_type)"
            )
    if getattr(args, "loss_weights", None) not in (None, [1.0]):
        raise ValueError(f"loss_weights: not used by SoLoPO, got {args.loss_weights!r}")
    if args.max_long_length is not None and (
        not isinstance(args.max_long_length, int) or args.max_long_length < 2
    ):
        raise ValueError(
            f"max_long_length: expected None or an int >= 2, got {args.max_long_length!r}"
        )
    packed = getattr(args, "max_packed_length", None)
    if packed is not None and (
        not isinstance(packed, int) or isinstance(packed, bool) or packed < 2
    ):
        raise ValueError(f"max_packed_length: expected None or an int >= 2, got {packed!r}")
    if not options.needs_reference and getattr(args, "sync_ref_model", False):
        raise ValueError(
            f"sync_ref_model: solopo_loss_type={options.loss_type!r} is reference-free; there is no "
            "reference model to sync"
        )
    reentrant = (getattr(args, "gradient_checkpointing_kwargs", None) or {}).get(
        "use_reentrant", False
    )
    if getattr(args, "gradient_checkpointing", False) and reentrant and options.uses_long:
        raise ValueError(
            "gradient_checkpointing_kwargs: use_reentrant=True is not supported: SoLoPO runs two policy "
            "forwards per step, which reentrant checkpointing breaks under DDP ('marked as ready twice'); "
            "use the default use_reentrant=False"
        )
    return options
