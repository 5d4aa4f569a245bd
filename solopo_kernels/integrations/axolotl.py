"""SoLoPO for Axolotl (tested with Axolotl 0.21.0, which pins TRL 1.14.1).

Enable it in the YAML config::

    plugins:
      - solopo_kernels.integrations.axolotl.SoLoPOPlugin
    rl: dpo
    solopo: true
    solopo_loss_type: dpo          # dpo, ipo, simpo, orpo, cpo
    solopo_alpha: 1.0
    solopo_long_prompt_field: long_prompt

Why it is built this way (Axolotl 0.21):

* The options are top-level keys: for ``rl: dpo`` each ``datasets:`` entry is coerced to
  Axolotl's ``DPODataset`` schema, which silently drops unknown per-dataset keys.
* The trainer is chosen through the ``trainer_cls`` config key (set by :meth:`SoLoPOPlugin.register`),
  not a plugin ``get_trainer_cls``: only ``trainer_cls`` keeps the model and the reference model
  as the trainer's positional arguments in Axolotl's RL builder.
* The training arguments reach the trainer through the plugin's training-args mixin
  (:class:`~.args.SoLoPOArguments`) and :meth:`SoLoPOPlugin.get_training_args`.

Importing this module needs pydantic (an Axolotl dependency) but not Axolotl: the argument
checks and the plugin's registration logic work without it; the trainer class
:data:`AxolotlSoLoPOTrainer` is built on first access and needs Axolotl.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, model_validator

from ..losses import REFERENCE_LOSS_TYPES, SoLoPOOptions
from .args import AXOLOTL_NAMES, HeadKernel, check_parallel_setup

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # Axolotl absent: keep the plugin logic importable and testable
    BasePlugin = object  # type: ignore[assignment,misc]

TRAINER_CLS = f"{__name__}.AxolotlSoLoPOTrainer"

# YAML key -> SoLoPOArguments field (the YAML keys carry a "solopo_" prefix because Axolotl's
# config is one flat namespace).
YAML_TO_TRAINING_ARGS = {
    "solopo_alpha": "solopo_alpha",
    "solopo_loss_type": "solopo_loss_type",
    "solopo_ra_target": "solopo_ra_target",
    "solopo_ra_distance": "solopo_ra_distance",
    "solopo_ra_use_reference": "solopo_ra_use_reference",
    "solopo_ra_gradient": "solopo_ra_gradient",
    "solopo_nll_average": "solopo_nll_average",
    "solopo_long_prompt_field": "long_prompt_column",
    "solopo_max_long_length": "max_long_length",
    "solopo_gamma": "gamma",
    "solopo_max_packed_length": "max_packed_length",
    "solopo_head_kernel": "head_kernel",
}


class SoLoPOArgs(BaseModel):
    """The plugin's top-level YAML keys (merged into Axolotl's config schema)."""

    solopo: bool | None = None
    solopo_alpha: float | None = None
    solopo_loss_type: Literal["dpo", "ipo", "simpo", "orpo", "cpo"] | None = None
    solopo_ra_target: Literal["chosen", "both"] | None = None
    solopo_ra_distance: Literal["abs", "squared"] | None = None
    solopo_ra_use_reference: bool | None = None
    solopo_ra_gradient: Literal["both", "long"] | None = None
    solopo_nll_average: Literal["sequence", "token"] | None = None
    solopo_long_prompt_field: str | None = None
    solopo_max_long_length: int | None = None
    solopo_gamma: float | None = None
    solopo_max_packed_length: int | None = None
    # The log-prob kernel's settings as one mapping: backend, chunk_size, options (KernelOptions'
    # fields), e.g. {backend: triton, options: {saved_logits_bytes: 1073741824}}.
    solopo_head_kernel: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def check_solopo_config(cls, data: Any) -> Any:
        """Reject the Axolotl settings SoLoPO would otherwise ignore or break (raw config dict)."""
        if isinstance(data, dict) and data.get("solopo"):
            check_axolotl_config(data)
        return data


def check_axolotl_config(cfg: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the key for a config that cannot train SoLoPO as written."""
    rl = str(cfg.get("rl") or "")
    if rl.lower().rsplit(".", 1)[-1] != "dpo":
        raise ValueError(
            f"rl: solopo needs rl: dpo (got {cfg.get('rl')!r}); choose the loss with solopo_loss_type "
            "(dpo, ipo, simpo, orpo, cpo): other rl values select other Axolotl trainers"
        )
    for key in ("dpo_loss_type", "dpo_loss_weights", "dpo_ld_alpha", "dpo_use_weighting"):
        if cfg.get(key) not in (None, False, "sigmoid", ["sigmoid"], [1.0]):
            raise ValueError(f"{key}: not used by SoLoPO (got {cfg[key]!r}); use the solopo_* keys")
    if cfg.get("pad_to_multiple_of"):
        raise ValueError(
            "pad_to_multiple_of: not supported with solopo (Axolotl then installs its own preference "
            "collator, which builds no long rows)"
        )
    if (cfg.get("gradient_checkpointing_kwargs") or {}).get("use_reentrant") and cfg.get(
        "gradient_checkpointing"
    ):
        raise ValueError(
            "gradient_checkpointing_kwargs: use_reentrant: true breaks SoLoPO's two policy forwards per "
            "step under DDP; use use_reentrant: false"
        )
    # The setups the trainer refuses too, refused here with the YAML keys' names.
    check_parallel_setup(
        precompute=bool(cfg.get("precompute_ref_log_probs")),
        needs_reference=(cfg.get("solopo_loss_type") or "dpo") in REFERENCE_LOSS_TYPES,
        cp_size=int(cfg.get("context_parallel_size") or 1),
        deepspeed=bool(cfg.get("deepspeed")),
        padding_free=bool(cfg.get("dpo_padding_free")),
        names=AXOLOTL_NAMES,
    )
    HeadKernel.coerce(cfg.get("solopo_head_kernel"), "solopo_head_kernel")
    max_long = cfg.get("solopo_max_long_length")
    if max_long is not None and (not isinstance(max_long, int) or max_long < 2):
        raise ValueError(f"solopo_max_long_length: expected an int >= 2, got {max_long!r}")
    # The loss options themselves; SoLoPOOptions names its fields, which are the YAML keys minus
    # the "solopo_" prefix (beta is checked by TRL's config: any positive value here).
    try:
        SoLoPOOptions(
            loss_type=cfg.get("solopo_loss_type") or "dpo",
            beta=1.0,
            alpha=1.0 if cfg.get("solopo_alpha") is None else cfg["solopo_alpha"],
            gamma=0.5 if cfg.get("solopo_gamma") is None else cfg["solopo_gamma"],
            ra_target=cfg.get("solopo_ra_target") or "chosen",
            ra_distance=cfg.get("solopo_ra_distance") or "abs",
            ra_use_reference=True
            if cfg.get("solopo_ra_use_reference") is None
            else cfg["solopo_ra_use_reference"],
            ra_gradient=cfg.get("solopo_ra_gradient") or "both",
            nll_average=cfg.get("solopo_nll_average") or "sequence",
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"solopo_{error}") from None


def training_args_from_config(cfg: Any) -> dict[str, Any]:
    """The :class:`~.args.SoLoPOArguments` values set in the config (unset keys keep the defaults)."""
    get = cfg.get if isinstance(cfg, dict) else functools.partial(getattr, cfg)
    return {
        field: get(key, None)
        for key, field in YAML_TO_TRAINING_ARGS.items()
        if get(key, None) is not None
    }


class SoLoPOPlugin(BasePlugin):
    """Axolotl plugin: ``rl: dpo`` + ``solopo: true`` trains with :class:`AxolotlSoLoPOTrainer`.

    Inert unless ``solopo: true`` (so listing it in ``plugins:`` changes nothing by itself).
    """

    def __init__(self) -> None:
        super().__init__()
        self._set_trainer_cls = False

    def get_input_args(self) -> str:
        return f"{__name__}.SoLoPOArgs"

    def get_training_args_mixin(self) -> str:
        return "solopo_kernels.integrations.args.SoLoPOArguments"

    def register(self, cfg: dict) -> None:
        """Before validation, on the raw config: route ``rl: dpo`` to the SoLoPO trainer. A
        ``trainer_cls`` already set is kept (it must subclass AxolotlSoLoPOTrainer; checked in
        :meth:`post_trainer_create`)."""
        if cfg.get("solopo") and not cfg.get("trainer_cls"):
            cfg["trainer_cls"] = TRAINER_CLS
            self._set_trainer_cls = True

    def on_config_validation_error(self, cfg: dict) -> None:
        if self._set_trainer_cls and cfg.get("trainer_cls") == TRAINER_CLS:
            del cfg["trainer_cls"]
            self._set_trainer_cls = False

    def get_training_args(self, cfg: Any) -> dict[str, Any] | None:
        return training_args_from_config(cfg) if cfg.solopo else None

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not cfg.solopo:
            return
        from .trl import SoLoPOTrainer

        if not isinstance(trainer, SoLoPOTrainer):
            raise RuntimeError(
                f"solopo: the trainer is a {type(trainer).__name__}, not a SoLoPOTrainer; check trainer_cls"
            )


@functools.cache
def _axolotl_trainer_class() -> type:
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer

    from .trl import SoLoPOTrainer

    class AxolotlSoLoPOTrainer(SoLoPOTrainer, AxolotlDPOTrainer):
        """SoLoPOTrainer with Axolotl's DPO trainer mixins (optimizers, schedulers, RNG, tags).

        With ``context_parallel_size > 1`` the rows are split by Axolotl's context-parallel engine
        (ringmaster's forward pre-hook) and the sums all-reduced over its group (see
        :mod:`.context_parallel`).
        """

        tag_names = ["axolotl", "dpo", "solopo"]
        _context_parallel_engine = "engine"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            config = getattr(self.accelerator, "parallelism_config", None)
            if config is not None and getattr(config, "cp_enabled", False):
                # Axolotl's ContextParallelPlugin refuses trainers that take no loss kwargs. This
                # one computes its own loss: its batches have no `labels`, so num_items_in_batch
                # stays None, and the Trainer keeps dividing the loss for gradient accumulation.
                self.model_accepts_loss_kwargs = True
                self.loss_is_scaled_for_ga = False

        def _context_parallel_plan(self) -> Any:
            from axolotl.monkeypatch.ring_attn import get_ring_attn_group

            from .context_parallel import engine_plan

            return engine_plan(self.accelerator, get_ring_attn_group())

    AxolotlSoLoPOTrainer.__module__ = __name__
    return AxolotlSoLoPOTrainer


def __getattr__(name: str) -> Any:
    # Built on first access so that this module imports without Axolotl.
    if name == "AxolotlSoLoPOTrainer":
        return _axolotl_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
