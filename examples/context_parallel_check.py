"""Context-parallel SoLoPO with real ring attention (PyTorch, through accelerate), against one GPU.

    torchrun --nproc_per_node 2 examples/context_parallel_check.py          # 2 CUDA GPUs
    torchrun --nproc_per_node 4 examples/context_parallel_check.py --long 16384

Expected: the last line reads ``PASS: loss ... grad norm ...`` and the command exits 0. The loss
and the gradient norm of one SoLoPOTrainer step (SoLo-DPO with a reference model, float32, SDPA)
split over the GPUs with ``ParallelismConfig(cp_size=N)`` and FSDP2 must equal those of the same
step on one GPU without context parallelism to 1e-4 relative (float32 attention computed in
another order: ring attention merges partial softmaxes).

The CPU test suite checks everything but the attention itself (tests/integrations/
test_context_parallel_trainer.py, with an exact all-gather stand-in for ring attention); this
script closes that gap where GPUs exist. It needs at least 2 CUDA GPUs and no network (the model
and data are built in code).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TORCHRUN_VARIABLES = {
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
}  # fmt: skip


def build(output_dir: str, cp_size: int, long_len: int, seed: int = 0):
    from accelerate.parallelism_config import ParallelismConfig
    from datasets import Dataset

    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer
    from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer

    words = [f"w{i}" for i in range(2000)]
    tok = tiny_tokenizer(words)
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    rows = []
    for _ in range(2):
        question = text(16)
        rows.append(
            {
                "prompt": text(256) + " " + question,
                "long_prompt": text(long_len) + " " + question,
                "chosen": " " + text(48),
                "rejected": " " + text(32),
            }
        )
    policy = tiny_llama(tok, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=4,
                        max_position_embeddings=long_len + 1024, seed=seed)  # fmt: skip
    policy.set_attn_implementation("sdpa")
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    extra = {}
    if cp_size > 1:
        extra = dict(
            parallelism_config=ParallelismConfig(cp_size=cp_size),
            fsdp="full_shard",
            fsdp_config={"fsdp_version": 2, "reshard_after_forward": True},
        )
    args = SoLoPOConfig(
        output_dir=output_dir, report_to="none", bf16=False, save_strategy="no",
        gradient_checkpointing=False, per_device_train_batch_size=2, max_length=None,
        max_steps=1, logging_steps=1, learning_rate=1e-5,
        solopo_loss_type="dpo", solopo_alpha=3.0, beta=0.1, disable_tqdm=True, **extra,
    )  # fmt: skip
    trainer = SoLoPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )  # fmt: skip
    return trainer


def step(trainer) -> tuple[float, float]:
    """Loss and gradient norm (before clipping) of one optimizer step, as ``trainer.train()`` logs
    them: the Trainer prepares the model (FSDP2, context-parallel hooks) and runs the step inside
    the context-parallel context as in any training run."""
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return float(log["loss"]), float(log["grad_norm"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", type=int, default=8192, help="long-context tokens")
    parser.add_argument("--single", type=Path, help=argparse.SUPPRESS)  # the 1-GPU reference run
    args = parser.parse_args()
    if args.single:
        with tempfile.TemporaryDirectory() as tmp:
            args.single.write_text(json.dumps(step(build(tmp, 1, args.long))))
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2 or world < 2:
        print("needs >= 2 CUDA GPUs under torchrun --nproc_per_node N (N >= 2)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        split = step(build(tmp, world, args.long))
    if int(os.environ["RANK"]) != 0:
        return 0
    # The reference: the same step, unsplit, on one GPU, in a process of its own.
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "single.json"
        cmd = [sys.executable, __file__, "--long", str(args.long), "--single", str(out)]
        subprocess.run(cmd, env=env, check=True)
        single = json.loads(out.read_text())
    loss_err = abs(split[0] - single[0]) / abs(single[0])
    norm_err = abs(split[1] - single[1]) / abs(single[1])
    verdict = "PASS" if max(loss_err, norm_err) <= 1e-4 else "FAIL"
    print(
        f"{verdict}: loss {split[0]:.6f} (cp={world}) vs {single[0]:.6f} (1 GPU), rel {loss_err:.2e}; "
        f"grad norm {split[1]:.6f} vs {single[1]:.6f}, rel {norm_err:.2e}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
