"""One unit of the grid: train one arm with one seed (or reuse its weights), evaluate it, save it.

Arms, for a preference loss X (``dpo``, ``simpo`` or ``orpo``), all on the same pairs and for the
same number of optimizer steps, with :class:`solopo_kernels.integrations.trl.SoLoPOTrainer`:

* ``short``: X on the short prompts (``solopo_alpha=0``; the long prompts are never read);
* ``expand-long``: X on the same pairs with the long prompt in place of the short one
  (``solopo_alpha=0``): the preference loss on long prompts, no decoupling;
* ``solo``: SoLo-X, X on the short prompts plus alpha times SoLo-RA on the long chosen
  response (alpha in the unit's settings, chosen on the dev set);
* ``solo-long``: the same with ``solopo_ra_gradient="long"``: the short-side reward inside
  SoLo-RA is a fixed target, so SoLo-RA's gradient reaches only the long side.

``base`` is the starting model itself (evaluated, never trained).

Cost of a trained unit: the median wall time of an optimizer step (forward, backward, optimizer;
for DPO the reference forward too) and the peak resident memory of the process while the
trainer is built and trains, above the resident memory just before (the policy and the data
were loaded already; the reference copy, optimizer state, activations and gradients count).
Workers run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, set by the parent),
so memory freed by an earlier unit is returned to the system and the high-water mark, reset
before each unit, follows the live allocations.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from .config import SOLO_VARIANTS, Preset
from .evaluation import evaluate_contexts
from .pipeline import Workspace, eval_contexts, read_jsonl, write_json


@dataclass(frozen=True)
class Unit:
    """One arm x seed x hyperparameter setting, evaluated on ``split`` (``dev`` or ``test``)."""

    loss_type: str  # "dpo", "simpo", "orpo", or "base" for the starting model
    variant: str  # "short", "expand-long", "solo", "solo-long", or "base"
    seed: int
    split: str
    hparams: dict[str, float] = field(default_factory=dict)

    @property
    def arm(self) -> str:
        """The arm's name in the tables: ``DPO``, ``DPO expand-long``, ``SoLo-DPO``, ``base``."""
        name = self.loss_type.upper().replace("SIMPO", "SimPO")
        return {
            "base": "base",
            "short": name,
            "expand-long": f"{name} expand-long",
            "solo": f"SoLo-{name}",
            "solo-long": f"SoLo-{name} RA-long",
        }[self.variant]

    @property
    def alpha(self) -> float:
        return float(self.hparams["alpha"]) if self.variant in SOLO_VARIANTS else 0.0

    @property
    def ra_gradient(self) -> str:
        return "long" if self.variant == "solo-long" else "both"

    @property
    def model_key(self) -> str:
        """Names the trained weights: the same for the dev and the test split."""
        if self.variant == "base":
            return "base"
        settings = "-".join(f"{k}{v:g}" for k, v in sorted(self.hparams.items()))
        return f"{self.loss_type}-{self.variant}-{settings}-seed{self.seed}"


def rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS mark (Linux); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _dataset(unit: Unit, pairs: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    rows = []
    for row in pairs:
        prompt = row["long_prompt"] if unit.variant == "expand-long" else row["prompt"]
        rows.append(
            {
                "prompt": prompt,
                "long_prompt": row["long_prompt"],
                "chosen": row["chosen"],
                "rejected": row["rejected"],
            }
        )
    return Dataset.from_list(rows)


def train(unit: Unit, preset: Preset, work: Workspace, model: Any, tokenizer: Any) -> dict:
    """Train ``model`` in place as ``unit``'s arm; return the cost and the last logged metrics."""
    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer

    dataset = _dataset(unit, read_jsonl(work.pairs))
    timer = StepTimer()
    rss_before = rss_kib("VmRSS")
    peak_valid = reset_peak_rss()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        config = SoLoPOConfig(
            output_dir=output_dir,
            solopo_loss_type=unit.loss_type,
            solopo_alpha=unit.alpha,
            solopo_ra_gradient=unit.ra_gradient,
            beta=unit.hparams["beta"],
            gamma=unit.hparams.get("gamma", 0.5),
            max_steps=preset.steps,
            per_device_train_batch_size=preset.batch_size,
            learning_rate=unit.hparams.get("lr", preset.learning_rate),
            lr_scheduler_type="constant",
            max_length=None,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            logging_steps=max(1, preset.steps // 10),
            disable_tqdm=True,
            seed=unit.seed,
            data_seed=unit.seed,
            dataloader_num_workers=0,
        )
        trainer = SoLoPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model) if unit.loss_type == "dpo" else None,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # disable_tqdm's log printer: one bar is enough
        output = trainer.train()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
    peak = rss_kib("VmHWM") if peak_valid else None
    return {
        "pairs": len(dataset),
        "steps": output.global_step,
        "train_seconds": time.perf_counter() - began,
        "step_seconds_median": statistics.median(timer.seconds),
        "peak_rss_above_start_mib": None if peak is None else (peak - rss_before) / 1024,
        "log": history,
    }


def run_unit(unit: Unit, preset: Preset, work: Workspace) -> dict[str, Any]:
    """Train (or reuse) and evaluate ``unit``; write and return its result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(unit.seed)
    tokenizer = AutoTokenizer.from_pretrained(work.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(work.starting_model, dtype=torch.float32)
    weights = work.model(unit.model_key)
    cost: dict[str, Any] | None = None
    cost_path = weights.with_suffix(".cost.json")
    if unit.variant != "base":
        if weights.exists() and cost_path.exists():
            model.load_state_dict(torch.load(weights, weights_only=True))
            cost = {**json.loads(cost_path.read_text()), "reused_weights": True}
        else:
            cost = train(unit, preset, work, model, tokenizer)
            weights.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), weights)
            write_json(cost_path, cost)
    began = time.perf_counter()
    evaluation = evaluate_contexts(
        model,
        tokenizer,
        eval_contexts(preset, work, unit.split),
        max_new_tokens=preset.max_new_tokens,
        batch_size=preset.eval_batch_size,
    )
    result = {
        "unit": {
            **asdict(unit),
            "arm": unit.arm,
            "alpha": unit.alpha,
            "ra_gradient": unit.ra_gradient,
        },
        "preset": preset.name,
        "fingerprint": preset.fingerprint(),
        "training": {
            "steps": preset.steps,
            "batch_size": preset.batch_size,
            "learning_rate": unit.hparams.get("lr", preset.learning_rate),
        },
        "cost": cost,
        "eval_seconds": time.perf_counter() - began,
        "threads": torch.get_num_threads(),
        **evaluation,
    }
    write_json(work.unit_result(unit.split, unit.model_key), result)
    return result


def init_worker(threads: int) -> None:
    """Worker set-up: few threads (the machine is shared) and nothing from a hub."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    torch.set_num_threads(threads)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run_unit_in_worker(unit: Unit, preset: Preset, work_root: str, results: str) -> dict:
    """:func:`run_unit` for a process pool (paths as strings)."""
    return run_unit(unit, preset, Workspace(Path(work_root), Path(results)))
