"""Liger kernels next to SoLoPO's forward patch: which work, which are refused, and why.

Liger reaches a model in two ways:

* TRL's ``use_liger_kernel=True`` (Axolotl: ``dpo_use_liger_kernel``): when training starts,
  transformers' ``Trainer.train()`` applies Liger to the model *instance*, with
  ``liger_kernel_config`` as the keyword arguments of Liger's ``apply_liger_kernel_to_<type>``.
* Class-level patches made before the model is built (Axolotl's Liger plugin: ``liger_rope``,
  ``liger_rms_norm``, ``liger_glu_activation``, ``liger_layer_norm``,
  ``liger_fused_linear_cross_entropy``; or ``apply_liger_kernel_to_llama()`` called by hand): the
  model is built with Liger's modules and functions.

How each kind meets :func:`~.model_patch.patch_solopo_forward`:

* The layer kernels (RoPE, RMSNorm, SwiGLU/GeGLU MLP, LayerNorm) live inside the backbone, which
  the patched forward runs (``model.base_model(...)``): they keep running, unchanged.
* Liger's fused linear cross-entropy replaces ``<Model>ForCausalLM.forward``. The patched forward
  never calls it when it computes log-probs, so a class-level patch is inert: this package's
  kernel computes the head, and Liger's loss neither runs nor saves anything (logged). An
  *instance*-level patch applied when training starts would replace the patched forward itself,
  so with ``use_liger_kernel`` it is turned off in ``liger_kernel_config`` (as TRL 1.16 does) and
  an explicit request for it is refused.
* Liger's kernels are Triton kernels written for CUDA GPUs. On any other device, each kernel
  that will run is first tried once, forward and backward, on a small tensor; one that fails
  refuses the trainer with a ``ValueError`` naming the option, instead of the Triton error at the
  first step. On the CPU every Triton kernel fails without ``TRITON_INTERPRET=1`` ("0 active
  drivers"); under it Liger's RoPE runs (liger-kernel 0.8.4 and 0.8.5), its RMSNorm and SwiGLU
  do not (the interpreter hands scalar kernel arguments over as Python floats, which those
  kernels call ``.to()`` on).

Import-light: nothing here imports Liger until a Liger kernel is found or requested.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Modules whose code is Liger's: the kernels themselves, and Axolotl's Liger-based variants.
_LIGER_MODULE_PREFIXES = ("liger_kernel.", "axolotl.integrations.liger.")
FLCE = "fused_linear_cross_entropy"


@dataclass(frozen=True)
class Kernel:
    """One kind of Liger kernel: its name in Liger's ``apply_liger_kernel_to_*`` functions (and
    in TRL's ``liger_kernel_config``), a label, and the Axolotl key that turns it on."""

    name: str
    label: str
    axolotl_key: str


KERNELS = {
    k.name: k
    for k in (
        Kernel("rope", "RoPE", "liger_rope"),
        Kernel("rms_norm", "RMSNorm", "liger_rms_norm"),
        Kernel("swiglu", "SwiGLU MLP", "liger_glu_activation"),
        Kernel("geglu", "GeGLU MLP", "liger_glu_activation"),
        Kernel("layer_norm", "LayerNorm", "liger_layer_norm"),
        Kernel(FLCE, "fused linear cross-entropy", "liger_fused_linear_cross_entropy"),
    )
}
# A Liger module class (or an instance forward bound from one) -> the kernel it runs.
_CLASS_NAME_TO_KERNEL = (
    ("RMSNorm", "rms_norm"),
    ("LayerNorm", "layer_norm"),
    ("SwiGLU", "swiglu"),
    ("GEGLU", "geglu"),
)


def _is_liger(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "") or "").startswith(_LIGER_MODULE_PREFIXES)


def _kernel_of_class_name(name: str) -> str:
    """The kernel a Liger module class runs; its own name for a kind this module does not know."""
    return next((kernel for key, kernel in _CLASS_NAME_TO_KERNEL if key in name), name)


def liger_kernels_in(model: torch.nn.Module) -> dict[str, str]:
    """The Liger kernels already in ``model``, as ``{kernel: where}``: Liger module classes (a
    class-level patch before the model was built), Liger ``forward`` methods bound to modules (an
    instance-level patch), a Liger RoPE function in a modeling module the model uses, and a Liger
    ``forward`` of the causal LM itself (fused linear cross-entropy). Kernels of kinds not in
    :data:`KERNELS` are reported under their class name."""
    found: dict[str, str] = {}
    heads = {id(model), id(model.get_base_model()) if hasattr(model, "get_base_model") else 0}
    for name, module in model.named_modules():
        instance_forward = getattr(vars(module).get("forward"), "__func__", None)
        if id(module) in heads:  # the causal LM: Liger replaces its forward for the loss
            for forward in (type(module).forward, instance_forward):
                if forward is not None and _is_liger(forward):
                    found.setdefault(
                        FLCE, f"{type(module).__name__}.forward ({forward.__module__})"
                    )
            continue
        liger_class = next((c for c in type(module).__mro__ if _is_liger(c)), None)
        if liger_class is not None:
            origin = liger_class.__name__
        elif instance_forward is not None and _is_liger(instance_forward):
            origin = instance_forward.__qualname__.split(".")[0]
        else:
            continue
        found.setdefault(_kernel_of_class_name(origin), f"{name} ({origin})")
    for module_name in {type(m).__module__ for m in model.modules()}:
        namespace = vars(sys.modules[module_name]) if module_name in sys.modules else {}
        for attr, value in namespace.items():
            if "rotary" in attr and callable(value) and _is_liger(value):
                found.setdefault("rope", f"{module_name}.{attr} ({value.__name__})")
    return found


def _requested_by_trl(args: Any, model: Any) -> set[str]:
    """The Liger kernels transformers will apply when training starts (``use_liger_kernel``):
    the ``apply_liger_kernel_to_<type>`` parameters that are on by default or in
    ``liger_kernel_config``, for the model's type (none for a type Liger does not patch)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if isinstance(model, str):
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model).model_type
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = getattr(getattr(base, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return set()
    config = args.liger_kernel_config or {}
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(apply).parameters.items()
        if name not in ("model", "cross_entropy") and parameter.default is not parameter.empty
    }
    return {name for name, default in defaults.items() if config.get(name, default)}


def _probe(kernel: str, device: torch.device) -> None:
    """Run Liger's ``kernel`` once, forward and backward, on small float32 tensors on ``device``
    (raises whatever the kernel raises)."""
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    if kernel == "rope":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        k = torch.randn(2, 1, 3, 8, device=device, requires_grad=True)
        angle = torch.randn(1, 3, 4, device=device).repeat(1, 1, 2)
        q, k = liger_rotary_pos_emb(x.view(2, 1, 3, 8), k, angle.cos(), angle.sin())
        inputs, output = (x, k), q.sum() + k.sum()
    else:
        layer = _probe_layer(kernel)().to(device)
        inputs, output = (x,), layer(x).sum()
    torch.autograd.grad(output, inputs)


def _probe_layer(kernel: str) -> Callable[[], torch.nn.Module]:
    config = SimpleNamespace(hidden_size=8, intermediate_size=16)
    if kernel == "rms_norm":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        return lambda: LigerRMSNorm(8)
    if kernel == "layer_norm":
        from liger_kernel.transformers.layer_norm import LigerLayerNorm

        return lambda: LigerLayerNorm(8)
    if kernel == "swiglu":
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        return lambda: LigerSwiGLUMLP(SimpleNamespace(**vars(config), hidden_act="silu"))
    if kernel == "geglu":
        from liger_kernel.transformers.geglu import LigerGEGLUMLP

        return lambda: LigerGEGLUMLP(
            SimpleNamespace(**vars(config), hidden_act="gelu_pytorch_tanh")
        )
    raise KeyError(kernel)


def _label(kernel: str) -> str:
    return KERNELS[kernel].label if kernel in KERNELS else kernel


def _cannot_run(kernel: str, device: torch.device) -> str | None:
    """Why Liger's ``kernel`` cannot run on ``device`` (``None`` when it can, or on CUDA, which
    Liger targets and which is not tried here)."""
    if device.type == "cuda":
        return None
    if kernel not in KERNELS or kernel == FLCE:
        return f"no check of this Liger kernel exists for {device.type}"
    try:
        with torch.random.fork_rng(devices=[]):  # the probe must not move the run's RNG
            _probe(kernel, device)
    except Exception as error:  # any failure of a foreign kernel means: cannot run here
        first_line = (str(error).strip().splitlines() or [""])[0][:200].rstrip(".")
        return f"it failed on a small {device.type} tensor: {type(error).__name__}: {first_line}"
    return None


def check_liger(args: Any, *models: Any) -> None:
    """Check the Liger kernels of a SoLoPO run before the trainer is built; raise ``ValueError``
    naming the option for one that cannot work.

    ``args`` is the trainer's ``TrainingArguments`` (``use_liger_kernel``,
    ``liger_kernel_config``, ``device``); ``models`` the policy (a module or a hub path) and the
    reference model, if any. With ``use_liger_kernel``, ``args.liger_kernel_config`` gets
    ``fused_linear_cross_entropy: False`` (see the module docstring).
    """
    use_liger = bool(getattr(args, "use_liger_kernel", False))
    requested: set[str] = set()
    if use_liger:
        config = dict(args.liger_kernel_config or {})
        if config.get(FLCE):
            raise ValueError(
                f'liger_kernel_config: {{"{FLCE}": True}} makes transformers replace the model\'s forward '
                "when training starts, which SoLoPO patches to compute the response log-probs with its "
                f"own fused kernel; leave {FLCE} unset (SoLoPOTrainer turns it off)"
            )
        args.liger_kernel_config = {**config, FLCE: False}
        requested = _requested_by_trl(args, models[0])
    found: dict[str, str] = {}
    for model in models:
        if isinstance(model, torch.nn.Module):
            for kernel, where in liger_kernels_in(model).items():
                found.setdefault(kernel, where)
    if FLCE in found:
        logger.info(
            "Liger's fused linear cross-entropy is on the model (%s): SoLoPOTrainer never calls that "
            "forward, its own kernel computes the response log-probs (so Liger's loss neither runs "
            "nor saves memory here)",
            found.pop(FLCE),
        )
    if not requested and not found:
        return
    device = torch.device(args.device)
    refusals = []
    for kernel in sorted(requested):
        why = _cannot_run(kernel, device)
        if why is not None:
            refusals.append(
                f"use_liger_kernel (Axolotl: dpo_use_liger_kernel) applies Liger's {_label(kernel)} "
                f"when training starts, and {why}; turn it off with "
                f'liger_kernel_config={{"{kernel}": False}} or use_liger_kernel=False'
            )
    for kernel, where in sorted(found.items()):
        why = _cannot_run(kernel, device)
        if why is not None:
            key = KERNELS[kernel].axolotl_key if kernel in KERNELS else "liger_*"
            refusals.append(
                f"{key} (Axolotl's Liger plugin, or a Liger patch already on the model) put "
                f"Liger's {_label(kernel)} at {where}, and {why}; set {key}: false"
            )
    if refusals:
        raise ValueError(
            f"Liger kernels that cannot run on this {device.type} device (Liger's kernels are "
            "Triton kernels for CUDA GPUs; on the CPU only some run, under TRITON_INTERPRET=1, "
            "slow, for tests):\n- " + "\n- ".join(refusals)
        )
    logger.info(
        "Liger kernels next to SoLoPO on %s: %s",
        device.type,
        ", ".join(sorted(requested | set(found))),
    )
