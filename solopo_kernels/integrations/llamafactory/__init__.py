"""SoLoPO and the memory-bounded log-prob head for LLaMA-Factory's DPO stage (tested with
LLaMA-Factory 0.9.5).

Run a LLaMA-Factory YAML (``stage: dpo``) through the launcher instead of ``llamafactory-cli``::

    python -m solopo_kernels.integrations.llamafactory train config.yaml

* ``pref_loss`` sigmoid, ipo, orpo, simpo (and hinge, kto_pair with ``solopo_alpha: 0``): the
  per-sequence log-probs come from this package's kernel inside the model's forward; no
  ``[tokens x vocab]`` logits exist. Losses and metrics are LLaMA-Factory's own code.
* ``solopo_alpha > 0``: SoLoPO, with a ``long_prompt`` column carried through LLaMA-Factory's
  converter, pairwise processor and template, and the SoLo-RA term added to LLaMA-Factory's loss.

Modules: :mod:`.args` (the ``solopo_*`` keys and their rules), :mod:`.data` (the long prompt
through the data path), :mod:`.trainer` (``SoLoPODPOTrainer``), :mod:`.launcher` (``run_exp``,
``main``, ``patched``). Importing this package needs LLaMA-Factory only for the names that use it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .args import SoLoPOLlamaFactoryArguments, split_solopo_args

TESTED_VERSIONS = ("0.9.5",)  # also in .launcher, which warns on any other version

__all__ = [
    "TESTED_VERSIONS",
    "SoLoPOLlamaFactoryArguments",
    "main",
    "patched",
    "run_exp",
    "split_solopo_args",
]

_LAZY = {"main": ".launcher", "patched": ".launcher", "run_exp": ".launcher"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name], __name__)
        except ModuleNotFoundError as error:
            if error.name != "llamafactory":
                raise
            raise ModuleNotFoundError(
                "solopo_kernels.integrations.llamafactory needs LLaMA-Factory: pip install "
                f"llamafactory=={TESTED_VERSIONS[-1]} (the version tested)",
                name="llamafactory",
            ) from error
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
