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
