"""One SoLoPO step (loss + gradients) on a fixed global batch of 4 pairs, run three ways:

* ``single``: 1 process, the whole batch (called in-process by the tests);
* ``ddp``: under ``torchrun --nproc_per_node 2`` on gloo, 2 pairs per rank, the policy wrapped in
  DDP by the trainer's accelerator, non-reentrant gradient checkpointing on (two policy forwards
  per step);
* ``fsdp2``: same launch, ``fully_shard`` on each decoder layer and on the root (which holds the
  embeddings, final norm and ``lm_head``), gradients gathered with ``full_tensor()``;
  ``fsdp2_separate_head``: ``lm_head`` in its own FSDP unit, which must raise.

Rank 0 saves ``{"loss": mean loss over ranks, "grads": {name: full gradient}}`` to the output path.

Usage: ``torchrun --nproc_per_node 2 -m tests.integrations.dist_worker MODE OUT_PATH``
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import torch

from tests.integrations import common

GLOBAL_BATCH = [0, 1, 2, 3]


def build(output_dir: str) -> Any:
    return common.trainer(output_dir, solopo_loss_type="dpo", solopo_alpha=2.0, beta=0.5)


def step(trainer: Any, model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
    """Loss of one step on ``indices``, backpropagated into ``model``."""
    loss = trainer.compute_loss(model, common.batch(trainer, indices))
    loss.backward()
    return loss.detach()


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = grad.detach().clone()
    return grads


def single(output_dir: str) -> dict[str, Any]:
    trainer = build(output_dir)
    loss = step(trainer, trainer.model, GLOBAL_BATCH)
    return {"loss": loss, "grads": full_grads(trainer.model)}


def distributed(mode: str, output_dir: str) -> dict[str, Any] | None:
    import torch.distributed as dist

    trainer = build(output_dir)  # the trainer's accelerator sets up the gloo process group
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = len(GLOBAL_BATCH) // world
    indices = GLOBAL_BATCH[rank * per_rank : (rank + 1) * per_rank]
    model = trainer.model
    if mode == "ddp":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = trainer.accelerator.prepare_model(model)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        if mode == "fsdp2_separate_head":
            fully_shard(model.lm_head)
        wrapped = fully_shard(model)
    loss = step(trainer, wrapped, indices)
    dist.all_reduce(loss)
    result = {"loss": loss / world, "grads": full_grads(model)}
    return result if rank == 0 else None


def main() -> None:
    mode, out_path = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as output_dir:
        if mode == "fsdp2_separate_head":
            try:
                distributed(mode, output_dir)
            except RuntimeError as error:
                result: Any = {"error": str(error)}
            else:
                result = {"error": None}
        else:
            result = distributed(mode, output_dir)
    if result is not None and torch.distributed.get_rank() == 0:
        torch.save(result, out_path)
    torch.distributed.barrier()
    # An explicit teardown: a gloo group left to interpreter shutdown can abort the process.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
