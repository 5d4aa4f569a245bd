"""Peak memory of one training step: SoLoPO (chosen-only) against long-context DPO.

Both runs train the tiny Llama of ``train_tiny_solopo.py`` on the same pairs at the same long
length, with the same kernels and a reference model:

* ``SoLoPO``: the policy and the reference see the short chosen+rejected pair and the long+chosen
  row (``solopo_alpha=1``, ``solopo_loss_type="dpo"``, ``ra_target="chosen"``);
* ``long-context DPO``: the policy and the reference see long+chosen and long+rejected (the same
  trainer with ``solopo_alpha=0`` and the long prompt as the prompt);
* ``TRL DPOTrainer (long)``: stock ``trl.DPOTrainer`` on the long pair, for reference (its fused
  LM head scores every position on the CPU, only the labelled ones on CUDA).

What is measured: the peak of the bytes of all CPU tensor storages allocated *during* the step
(forward, backward, optimizer step), tallied by a ``TorchDispatchMode`` that adds a storage's
size when an op creates it and subtracts it when the storage is freed (the CPU analogue of
``torch.cuda.max_memory_allocated`` minus the memory held before the step: parameters and the
batch are not counted; the optimizer state created by this first step is).

    python examples/compare_step_memory.py --long-tokens 2048
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

for _var in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_solopo import GLUE, ITEMS, NAMES, PLACES, make_pairs  # noqa: E402


class StoragePeak(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata  # one StorageImpl, however many views point at it
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            # Storages keep their Python object while the StorageImpl lives: this runs on free.
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def one_step(trainer: Any) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(peak bytes, batch shapes) of forward + backward + optimizer step on the first batch."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    model.train()
    if trainer.args.gradient_checkpointing:  # Trainer.train() would switch it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = (
        1  # set by Trainer.train(), which is not used here
    )
    meter = StoragePeak()
    with meter:
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    shapes = {k: tuple(v.shape) for k, v in batch.items() if k.endswith("input_ids")}
    return meter.peak, shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--long-tokens", type=int, default=2048, help="approximate long prompt length"
    )
    parser.add_argument("--batch-pairs", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    tokenizer = tiny_tokenizer(NAMES + ITEMS + PLACES + GLUE)
    model = tiny_llama(
        tokenizer, hidden_size=args.hidden_size, max_position_embeddings=2 * args.long_tokens + 64
    )
    rows = make_pairs(args.batch_pairs, args.long_tokens // 8, random.Random(0))  # 8 tokens a fact
    long_rows = [{**r, "prompt": r["long_prompt"]} for r in rows]
    common = dict(
        per_device_train_batch_size=args.batch_pairs,
        max_length=None,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )

    def run(label: str, trainer_cls: Any, config_cls: Any, data: list[dict], **options: Any) -> int:
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = trainer_cls(
                model=copy.deepcopy(model),
                ref_model=copy.deepcopy(model),
                args=config_cls(output_dir=output_dir, **common, **options),
                train_dataset=Dataset.from_list(data),
                processing_class=tokenizer,
            )
            peak, shapes = one_step(trainer)
        print(f"{label:26s} {peak / 2**20:10.1f} MiB   {shapes}")
        return peak

    from trl import DPOConfig, DPOTrainer

    print(
        f"tiny Llama (hidden {args.hidden_size}, 2 layers), {args.batch_pairs} pairs, long prompts of ~{args.long_tokens} tokens"
    )
    print(f"{'':26s} {'peak':>14s}   rows x tokens")
    solopo = run("SoLoPO (chosen-only)", SoLoPOTrainer, SoLoPOConfig, rows, solopo_alpha=1.0)
    dpo = run("long-context DPO", SoLoPOTrainer, SoLoPOConfig, long_rows, solopo_alpha=0.0)
    run("TRL DPOTrainer (long)", DPOTrainer, DPOConfig, long_rows)
    print(f"SoLoPO / long-context DPO peak: {solopo / dpo:.2f}")


if __name__ == "__main__":
    main()
