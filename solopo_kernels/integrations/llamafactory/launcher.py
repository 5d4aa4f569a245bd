"""The launcher: LLaMA-Factory's own ``train`` entry point with the patches of this package.

Why a launcher: LLaMA-Factory has no plugin hook. Its DPO workflow (``run_dpo``) builds
``CustomDPOTrainer`` and the pairwise data processor itself, and its argument parser rejects unknown
YAML keys. So :func:`run_exp` takes the ``solopo_*`` keys out of the arguments, checks them, and
runs LLaMA-Factory's ``run_exp`` (the function behind ``llamafactory-cli train``) with four
attributes of LLaMA-Factory replaced for the duration of the call (:func:`patched`), and restored
after it:

* ``llamafactory.train.dpo.trainer.CustomDPOTrainer`` -> :class:`.trainer.SoLoPODPOTrainer`
  (always: the fused log-prob head);
* with ``solopo_alpha > 0``: ``DatasetAttr.join`` (reads ``columns.long_prompt``),
  ``converter.get_dataset_converter`` (adds ``_long_prompt``) and
  ``loader._get_dataset_processor`` (adds the long rows), see :mod:`.data`.

Everything else, including the model and tokenizer loading, templates, LoRA, DeepSpeed and the
saving of checkpoints, is LLaMA-Factory's code, unchanged.

Command line, like ``llamafactory-cli train``::

    python -m solopo_kernels.integrations.llamafactory train config.yaml [key=value ...]
    solopo-llamafactory train config.yaml [key=value ...]

On a machine with several GPUs (or with ``FORCE_TORCHRUN=1``) it starts itself under
``torchrun`` like ``llamafactory-cli`` does, with the same environment variables (``NNODES``,
``NODE_RANK``, ``NPROC_PER_NODE``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import llamafactory  # here, so that a missing LLaMA-Factory fails on import with the fix
import llamafactory.extras.packages  # noqa: F401  (before trl: it corrects the package check TRL reads)

from .args import SoLoPOLlamaFactoryArguments, check_stage, split_solopo_args

logger = logging.getLogger(__name__)
TESTED_VERSIONS = ("0.9.5",)

USAGE = (
    "usage: python -m solopo_kernels.integrations.llamafactory train CONFIG.yaml [key=value ...]\n"
    "  CONFIG.yaml: a LLaMA-Factory training config with stage: dpo, plus optional solopo_* keys\n"
    "  (see solopo_kernels/integrations/README.md, 'LLaMA-Factory')"
)


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def patched(solopo: SoLoPOLlamaFactoryArguments) -> Iterator[None]:
    """LLaMA-Factory with this package's DPO trainer (and, for ``solopo_alpha > 0``, the long-prompt
    data path) while the block runs; restored on exit."""
    import llamafactory.data.converter as converter
    import llamafactory.data.loader as loader
    import llamafactory.data.parser as parser
    import llamafactory.train.dpo.trainer as dpo_trainer

    from .data import wrap_get_dataset_converter, wrap_get_dataset_processor, wrap_join
    from .trainer import SoLoPODPOTrainer

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _replaced(
                dpo_trainer, "CustomDPOTrainer", functools.partial(SoLoPODPOTrainer, solopo=solopo)
            )
        )
        if solopo.uses_long:
            stack.enter_context(
                _replaced(parser.DatasetAttr, "join", wrap_join(parser.DatasetAttr.join))
            )
            stack.enter_context(
                _replaced(
                    converter,
                    "get_dataset_converter",
                    wrap_get_dataset_converter(converter.get_dataset_converter),
                )
            )
            stack.enter_context(
                _replaced(
                    loader,
                    "_get_dataset_processor",
                    wrap_get_dataset_processor(loader._get_dataset_processor, solopo),
                )
            )
        yield


def run_exp(
    args: dict[str, Any] | list[str] | None = None, callbacks: list[Any] | None = None
) -> None:
    """LLaMA-Factory's ``run_exp`` (``llamafactory-cli train``) with the ``solopo_*`` keys.

    ``args``: a dict of LLaMA-Factory's keys plus ``solopo_*`` keys, a list of ``--key value``
    strings, or None (``sys.argv``: a YAML/JSON path and ``key=value`` overrides, as
    ``llamafactory-cli train`` reads them). ``callbacks``: ``transformers.TrainerCallback`` s.
    """
    from llamafactory.extras.misc import use_ray
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp as llamafactory_run_exp

    if use_ray():
        raise ValueError(
            "USE_RAY: Ray workers would not see solopo_kernels' patches; run without USE_RAY (use "
            "torchrun, or this launcher, which starts torchrun on a multi-GPU machine)"
        )
    if llamafactory.__version__ not in TESTED_VERSIONS:
        logger.warning(
            "LLaMA-Factory %s: solopo_kernels' integration is tested with %s only",
            llamafactory.__version__,
            ", ".join(TESTED_VERSIONS),
        )
    lf_args, solopo = split_solopo_args(read_args(args))
    check_stage(lf_args, solopo)
    with patched(solopo):
        llamafactory_run_exp(lf_args, callbacks)


def _torchrun_command(argv: list[str]) -> list[str] | None:
    """The ``torchrun`` command that reruns this launcher on every local device, or None when it
    should run in this process (already under torchrun, or one device and no FORCE_TORCHRUN)."""
    from llamafactory.extras.misc import find_available_port, get_device_count, is_env_enabled

    if "LOCAL_RANK" in os.environ:
        return None
    if not (is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1):
        return None
    return [
        "torchrun",
        "--nnodes",
        os.getenv("NNODES", "1"),
        "--node_rank",
        os.getenv("NODE_RANK", "0"),
        "--nproc_per_node",
        os.getenv("NPROC_PER_NODE", str(get_device_count())),
        "--master_addr",
        os.getenv("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        os.getenv("MASTER_PORT", str(find_available_port())),
        "-m",
        "solopo_kernels.integrations.llamafactory",
        "train",
        *argv,
    ]


def main(argv: list[str] | None = None) -> int:
    """``train CONFIG.yaml [key=value ...]`` (or ``train --key value ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 2
    argv = argv[1:]
    command = _torchrun_command(argv)
    if command is not None:
        return subprocess.run(command, check=False).returncode
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # LLaMA-Factory's read_args reads sys.argv
    try:
        run_exp()
    finally:
        sys.argv = saved
    return 0
