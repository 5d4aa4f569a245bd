"""A few SoLoPOTrainer steps under DeepSpeed ZeRO-3 on 2 CPU processes, and the same steps in 1
process without DeepSpeed, written the way a user's training script is.

Both runs load the tiny models that :func:`save_models` wrote (``from_pretrained``; under ZeRO-3
after the DeepSpeed config is known, so transformers builds them partitioned), train ``STEPS``
optimizer steps of 4 pairs each (2 per process under ZeRO-3, 4 in the single process; sequential
sampling gives both the same pairs per step) and return ``{"losses", "grad_norms"}`` (per step,
as logged by Trainer, averaged over processes) and ``"params"`` (the final parameters, gathered
from their ZeRO-3 partitions) with ``"start"`` (the parameters as loaded).

``simpo`` trains a policy with tied input and output embeddings (reference-free); ``dpo`` an
untied policy against an untied reference model that differs from it.

The ZeRO-3 config partitions every parameter (``stage3_param_persistence_threshold: 0``: without
it DeepSpeed keeps parameters below ``10 * hidden`` elements whole on every rank, which would
include the tiny ``lm_head``).

Usage: ``torchrun --nproc_per_node 2 -m tests.integrations.zero3_worker LOSS_TYPE MODEL_DIR OUT``
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch

from tests.integrations import common

STEPS = 3
GLOBAL_BATCH = 4
LEARNING_RATE = 0.1
LOSS_TYPES = ("simpo", "dpo")

ZERO3_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,  # torch.optim.SGD, see the module docstring
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def save_models(model_dir: str | Path) -> None:
    """Writes ``policy_tied`` (simpo's), ``policy`` and ``reference`` (dpo's) under ``model_dir``."""
    tok = common.tokenizer()
    from solopo_kernels.tiny_models import tiny_llama

    tiny_llama(tok, seed=0, tie_word_embeddings=True).save_pretrained(
        Path(model_dir, "policy_tied")
    )
    policy, reference = common.model_pair(tok, seed=1)
    policy.save_pretrained(Path(model_dir, "policy"))
    reference.save_pretrained(Path(model_dir, "reference"))


def _rows() -> list[tuple[str, str, str, str]]:
    """8 pairs: the shared ones, then the same with chosen and rejected swapped (2 distinct
    global batches; the third step sees the first again, with other parameters)."""
    return common.ROWS + [(s, long, r, c) for s, long, c, r in common.ROWS]


def train(loss_type: str, model_dir: str, output_dir: str, *, zero3: bool) -> dict[str, Any]:
    """``STEPS`` SoLoPOTrainer steps of ``loss_type`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer

    world = 1
    options: dict[str, Any] = {}
    if zero3:
        if not torch.cuda.is_available():
            _cpu_deepspeed_setup()
            options["accelerator_config"] = {"use_configured_state": True}
        options["deepspeed"] = copy.deepcopy(ZERO3_CONFIG)
        world = torch.distributed.get_world_size()
    else:
        options["use_cpu"] = True
    args = SoLoPOConfig(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        solopo_loss_type=loss_type,
        solopo_alpha=1.0,
        beta=0.5 if loss_type == "dpo" else 2.0,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        train_sampling_strategy="sequential",
        max_steps=STEPS,
        logging_steps=1,
        optim="sgd",
        learning_rate=LEARNING_RATE,
        max_grad_norm=0.0,
        **options,
    )
    # After the config, as in a user's script: under ZeRO-3 the models are built partitioned.
    if loss_type == "simpo":
        policy = AutoModelForCausalLM.from_pretrained(Path(model_dir, "policy_tied"))
        reference = None
    else:
        policy = AutoModelForCausalLM.from_pretrained(Path(model_dir, "policy"))
        reference = AutoModelForCausalLM.from_pretrained(Path(model_dir, "reference"))
    trainer = SoLoPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=common.dataset(_rows()),
        processing_class=common.tokenizer(),
    )
    start = full_parameters(trainer.model)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": torch.tensor([entry["loss"] for entry in logs], dtype=torch.float64),
        "grad_norms": torch.tensor([entry["grad_norm"] for entry in logs], dtype=torch.float64),
        "start": start,
        "params": full_parameters(trainer.model),
        "setup": _describe(trainer),
    }


def _cpu_deepspeed_setup() -> None:
    """What a script needs to run DeepSpeed on a host without CUDA (DeepSpeed's CPU accelerator)."""
    import deepspeed.ops

    # The CPU accelerator's comm backend JIT-compiles a shared-memory all-reduce (C++/OpenMP: about
    # 3 minutes on a busy 2-core machine, and a compiler on the test machine) when it starts. Only DeepSpeed's
    # inference all-reduce uses it; ZeRO-3 training all-gathers and reduce-scatters through
    # torch.distributed (gloo). Marked unavailable, it is neither built nor used.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # accelerate 1.15 picks no process-group backend for DeepSpeed without CUDA: each process
    # would train alone. A PartialState set up for gloo first, reused by TrainingArguments
    # (``accelerator_config={"use_configured_state": True}``), starts DeepSpeed's comm on gloo.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")


def _describe(trainer: Any) -> dict[str, Any]:
    """How the run was set up: the engine, its process count and ZeRO stage, and the local
    partition sizes of the ``lm_head`` weights (full size: 1 process, or no ZeRO-3)."""
    heads = {"policy": trainer.accelerator.unwrap_model(trainer.model)}
    if trainer.ref_model is not None:
        heads["reference"] = getattr(trainer.ref_model, "module", trainer.ref_model)
    partitions = {}
    for name, model in heads.items():
        weight = model.get_output_embeddings().weight
        local = weight.ds_tensor.numel() if hasattr(weight, "ds_tensor") else weight.numel()
        full = weight.ds_numel if hasattr(weight, "ds_numel") else weight.numel()
        partitions[name] = (local, full)
    plugin = trainer.accelerator.state.deepspeed_plugin
    return {
        "engine": type(trainer.model_wrapped).__name__,
        "processes": trainer.accelerator.num_processes,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "lm_head_partition": partitions,
    }


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of all parameters, all-gathered first where ZeRO-3 partitions them (a collective:
    every process calls it)."""
    params = dict(model.named_parameters())
    gather = _zero3_gather(list(params.values()))
    with gather:
        return {name: p.detach().clone() for name, p in params.items()}


def _zero3_gather(params: list[torch.nn.Parameter]) -> Any:
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def main() -> None:
    loss_type, model_dir, out_path = sys.argv[1:4]
    result = train(loss_type, model_dir, str(Path(out_path).parent / "trainer"), zero3=True)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out_path)
    torch.distributed.barrier()
    # An explicit teardown: a gloo group left to interpreter shutdown can abort the process.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
