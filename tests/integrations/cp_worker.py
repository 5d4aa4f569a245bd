"""SoLoPOTrainer steps under context parallelism on 2 gloo CPU processes, against one process.

Ring attention needs CUDA (PyTorch's ``context_parallel``, Axolotl's ringmaster kernels), so the
attention here is an exact CPU stand-in registered as a transformers attention function: each
rank all-gathers the keys, values and positions of the group's slices (differentiably) and attends
its own queries causally by global position. Everything else is the trainer's real
context-parallel path: model inputs built on the whole row with the labels shifted before the
split, the slices cut either by the trainer (``shard_inputs=True``, as for accelerate) or by an
engine pre-hook on the model that splits every ``(B, S)`` tensor argument and pads
``shift_labels`` with -100 (``shard_inputs=False``, as Axolotl's ringmaster does), partial sums
all-reduced in the loss, the reference's too, and the gradient scaled for the engine's average.
The engine's gradient reduction is emulated by averaging each gradient over the 2 ranks.

The stand-in attends over the whole row only inside the context-parallel context (where ring
attention replaces SDPA); outside it, it attends within the rank's own slice, which is what plain
attention does on a slice. So a step that forgets to enter the context (as DPOTrainer's
``prediction_step`` did in evaluation) gives a wrong loss here, as it would on GPUs. For the cases
sharded by an engine hook the engine's attention is always on (ringmaster patches the attention
function itself).

Evaluation cases (``eval``) run ``prediction_step`` on the policy in eval mode, with a reference
model or with the reference log-probs precomputed while the trainer was built, and compare the
loss and every logged metric with one process.

Usage: ``torchrun --nproc_per_node 2 -m tests.integrations.cp_worker OUT_PATH``; rank 0 writes
``{case: {"loss": (single, cp), "grad_errors": {name: max relative error}}}`` or the error.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist

from solopo_kernels import context_parallel as cp
from solopo_kernels.integrations.context_parallel import ContextParallelPlan
from tests import reference
from tests.integrations import common

ATTENTION = "solopo_test_allgather_cp"
# (loss type, ra_target, shard order, who cuts the slices, what runs)
CASES = [
    ("dpo", "chosen", "head_tail", True, "train"),
    ("ipo", "both", "contiguous", True, "train"),
    ("simpo", "both", "contiguous", False, "train"),
    ("orpo", "chosen", "head_tail", False, "train"),
    ("dpo", "both", "head_tail", True, "eval"),
    ("dpo", "chosen", "head_tail", True, "eval-precomputed"),
    # An MoE policy (tiny Qwen3-MoE) with its router load-balancing loss: the router sums of the
    # slices (padding left out) are all-reduced like the log-prob sums.
    ("simpo", "chosen", "head_tail", True, "train-moe"),
    ("dpo", "both", "contiguous", False, "train-moe"),
]
# Whether ring attention is on (inside the context-parallel context, or an engine's).
RING = {"on": False}


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 (sequence) in the group's rank order; the backward sums the
    gradient over the ranks and keeps this rank's block."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.size = tensor.shape[2]
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.size
        return grad[:, :, start : start + ctx.size]


def allgather_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of this rank's queries over the whole row (query ``(B, Hq, s, D)``, key
    and value ``(B, Hkv, s, D)``, ``position_ids (B, s)``): the exact result of attention over the
    unsplit row, whatever the slice order."""
    positions = kwargs["position_ids"]
    if RING["on"]:
        keys, values = _GatherSequence.apply(key), _GatherSequence.apply(value)
        all_positions = [torch.empty_like(positions) for _ in range(dist.get_world_size())]
        dist.all_gather(all_positions, positions.contiguous())
        key_positions = torch.cat(all_positions, dim=1)
    else:  # plain attention over this rank's slice only
        keys, values, key_positions = key, value, positions
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    visible = key_positions[:, None, None, :] <= positions[:, None, :, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ values).transpose(1, 2).contiguous(), None


def engine_hook(order: str) -> Any:
    """A forward pre-hook that shards like a context-parallel engine (ringmaster): every tensor
    argument with the sequence length at dim 1, padded (``shift_labels`` with -100, positions
    continuing, the rest with 0) and cut in ``order``. With ``SOLOPO_CP_ENGINE=ringmaster`` (and
    the ``axolotl-ringmaster`` package installed) it calls ringmaster's own batch preparation and
    sharding instead of this re-statement of it."""
    if os.environ.get("SOLOPO_CP_ENGINE") == "ringmaster":
        from ringmaster.shard import prepare_global_batch, shard_batch

        def ringmaster_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
            kwargs = prepare_global_batch(dict(kwargs))
            kwargs, _ = shard_batch(
                kwargs, cp_rank=dist.get_rank(), cp_size=dist.get_world_size(), load_balance=order
            )
            return args, kwargs

        return ringmaster_hook

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        rank, world = dist.get_rank(), dist.get_world_size()
        length = kwargs["input_ids"].shape[1]
        total = cp.padded_length(length, world, order)
        index = cp.shard_indices(total, world, rank, order)
        for name, value in list(kwargs.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[1] == length:
                if name == "position_ids":
                    value = torch.arange(total).expand(value.shape[0], total)
                else:
                    pad = -100 if name == "shift_labels" else 0
                    value = cp.pad_sequence(value, total, pad)
                kwargs[name] = value.index_select(1, index)
        return args, kwargs

    return hook


def _loss_and_grads(trainer: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and gradients, in the context the Trainer's training_step uses."""
    model = trainer.model
    model.zero_grad()
    cp_context, batch = trainer._prepare_context_parallel_inputs(model, batch)
    with cp_context():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _eval_loss_and_metrics(trainer: Any, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    trainer.model.eval()
    trainer._metrics["eval"].clear()
    loss, logits, labels = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    assert logits is None and labels is None
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@contextlib.contextmanager
def _ring_on() -> Any:
    """The stand-in for accelerate's context-parallel context: ring attention on."""
    RING["on"] = True
    try:
        yield
    finally:
        RING["on"] = False


def run_case(case: tuple, output_dir: str) -> dict[str, Any]:
    loss_type, ra_target, order, shard_inputs, what = case
    tok = common.tokenizer()
    moe = what.endswith("-moe")
    if moe:
        from tests.integrations.test_moe import moe_model

        policy, ref = moe_model("qwen3_moe", tok), moe_model("qwen3_moe", tok, seed=1)
    else:
        policy, ref = common.model_pair(tok)
    trainer = common.trainer(
        output_dir,
        tok=tok,
        policy=policy,
        ref=ref if loss_type in ("dpo", "ipo") else None,
        solopo_loss_type=loss_type,
        solopo_ra_target=ra_target,
        solopo_alpha=1.5,
        beta=0.5,
        precompute_ref_log_probs=what == "eval-precomputed",
        **({"router_aux_loss_coef": 0.5} if moe else {}),
    )
    batch = common.batch(trainer, [0, 1, 2, 3])
    if what.startswith("eval"):
        single_loss, single_metrics = _eval_loss_and_metrics(trainer, copy.deepcopy(batch))
    else:
        single_loss, single_grads = _loss_and_grads(trainer, copy.deepcopy(batch))

    models = [m for m in (trainer.model, trainer.ref_model) if m is not None]
    hooks = []
    for model in models:
        model.set_attn_implementation(ATTENTION)
        if not shard_inputs:
            hooks.append(model.register_forward_pre_hook(engine_hook(order), with_kwargs=True))
    plan = ContextParallelPlan(
        group=dist.group.WORLD, order=order, shard_inputs=shard_inputs, gradient_scale=2.0
    )
    trainer._cp_plan = plan
    trainer._context_parallel_context = lambda plan: _ring_on
    RING["on"] = not shard_inputs  # an engine's ring attention is always on
    try:
        if what.startswith("eval"):
            cp_loss, cp_metrics = _eval_loss_and_metrics(trainer, copy.deepcopy(batch))
        else:
            cp_loss, cp_grads = _loss_and_grads(trainer, copy.deepcopy(batch))
    finally:
        RING["on"] = False
        for hook in hooks:
            hook.remove()
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, cp_loss)
    errors = {}
    if what.startswith("eval"):
        assert cp_metrics.keys() == single_metrics.keys(), (cp_metrics, single_metrics)
        for name, value in cp_metrics.items():
            if name == "num_tokens":
                # Counted from accelerate's gather over all processes, divided by the group
                # size; here each rank's accelerator is a single process (no gather across
                # them), so the count is not comparable.
                continue
            errors[name] = abs(value - single_metrics[name]) / max(abs(single_metrics[name]), 1e-6)
    else:
        for name, grad in cp_grads.items():
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)  # the engine's average over the group
            errors[name] = reference.max_relative_error(grad, single_grads[name])
    if moe:  # the loss held the router term: both logged the same load-balancing loss
        aux = trainer._metrics["train"]["aux_loss"]
        errors["aux_loss"] = abs(aux[-1] - aux[-2]) / abs(aux[-2])
    return {
        "loss": (single_loss.item(), cp_loss.item()),
        "ranks_agree": all(torch.equal(x, losses[0]) for x in losses),
        "grad_errors": errors,
    }


def main() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, allgather_attention)
    out_path = sys.argv[1]
    results: dict[str, Any] = {}
    for case in CASES:
        try:
            with tempfile.TemporaryDirectory() as output_dir:
                results["/".join(map(str, case))] = run_case(case, output_dir)
        except Exception:
            results["/".join(map(str, case))] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
