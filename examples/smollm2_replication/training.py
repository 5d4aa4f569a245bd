"""One unit of the grid: train one SimPO arm with one seed (or reuse its adapter), evaluate it with
``solopo-data evaluate``, save the result.

Arms, all SimPO with :class:`solopo_kernels.integrations.trl.SoLoPOTrainer` on the same pairs for
the same number of optimizer steps (the names are the earlier experiment's, :class:`Unit`):

* ``short`` (SimPO): the short prompts only (``solopo_alpha=0``);
* ``expand-long`` (SimPO expand-long): the long prompt in place of the short one
  (``solopo_alpha=0``), no decoupling;
* ``solo`` (SoLo-SimPO): SimPO on the short prompts plus alpha times SoLo-RA on the long chosen
  response;
* ``solo-long`` (SoLo-SimPO RA-long): the same with ``solopo_ra_gradient="long"``.

``base`` is SmolLM2-135M-Instruct itself (evaluated, never trained).

Training is LoRA (peft) on every linear projection of the decoder; the merged model is saved as
a plain Hugging Face folder for the evaluation and deleted afterwards (the adapter is kept, so a
rerun, or the test phase of the dev sweep's first seed, does not train again). The evaluation is
the command a user runs, ``solopo-data evaluate`` on the split's context files, with the
transformers backend in this process or, given a vLLM interpreter, the vLLM backend in a
subprocess; its answers are resumable, so a unit stopped in the middle of its evaluation picks up
there.

Cost of a trained unit: the median wall time of an optimizer step and the peak resident memory
of the process while it trains, above the resident memory before (see the earlier experiment's
training module, whose helpers these are).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from replication.training import StepTimer, Unit, reset_peak_rss, rss_kib
from transformers import PrinterCallback

from .config import Preset
from .pipeline import (
    REPO,
    VLLM_ENGINE,
    Workspace,
    read_jsonl,
    run_cli,
    split_contexts,
    vllm_env,
    write_json,
)

#: The loss of every arm (the unit's ``loss_type``).
LOSS_TYPE = "simpo"


def unit(variant: str, seed: int, split: str, hparams: dict[str, float] | None = None) -> Unit:
    """A SimPO unit (``variant`` "base" for the untrained model)."""
    return Unit("base" if variant == "base" else LOSS_TYPE, variant, seed, split, hparams or {})


def steps_of(preset: Preset, pairs: int) -> int:
    """Optimizer steps: ``epochs`` passes over ``pairs`` in steps of ``batch_size``."""
    return max(1, math.ceil(preset.epochs * pairs / preset.batch_size))


def _dataset(variant: str, pairs: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    rows = [
        {
            "prompt": row["long_prompt"] if variant == "expand-long" else row["prompt"],
            "long_prompt": row["long_prompt"],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
        }
        for row in pairs
    ]
    return Dataset.from_list(rows)


def lora_config(preset: Preset) -> Any:
    """LoRA of rank ``preset.lora_rank`` (scale 2) on every linear projection but the head;
    None for rank 0 (full fine-tuning: measured in the pilot, not used by the grid, whose units
    keep adapters)."""
    from peft import LoraConfig

    if not preset.lora_rank:
        return None

    return LoraConfig(
        r=preset.lora_rank,
        lora_alpha=2 * preset.lora_rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def train(
    unit: Unit, preset: Preset, work: Workspace, model: Any, tokenizer: Any
) -> tuple[Any, dict]:
    """Train ``unit``'s arm as a LoRA adapter on ``model``; return the peft model and the cost."""
    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer

    pairs = read_jsonl(work.pairs)
    dataset = _dataset(unit.variant, pairs)
    timer = StepTimer()
    rss_before = rss_kib("VmRSS")
    peak_valid = reset_peak_rss()
    began = time.perf_counter()
    steps = steps_of(preset, len(pairs))
    with tempfile.TemporaryDirectory() as output_dir:
        config = SoLoPOConfig(
            output_dir=output_dir,
            solopo_loss_type=LOSS_TYPE,
            solopo_alpha=unit.alpha,
            solopo_ra_gradient=unit.ra_gradient,
            beta=preset.beta,
            gamma=preset.gamma,
            max_steps=steps,
            per_device_train_batch_size=preset.batch_size,
            learning_rate=unit.hparams["lr"],
            lr_scheduler_type="constant",
            max_length=None,
            use_cpu=True,
            bf16=preset.bf16,
            # TRL's default recomputes activations: nothing to save at 512 tokens with LoRA
            # (transformers' current name; the old one warns)
            activation_checkpointing=False,
            report_to="none",
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            disable_tqdm=True,
            seed=unit.seed,
            data_seed=unit.seed,
            dataloader_num_workers=0,
        )
        trainer = SoLoPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(preset),
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        trained = trainer.model
    peak = rss_kib("VmHWM") if peak_valid else None
    cost = {
        "pairs": len(dataset),
        "steps": output.global_step,
        "train_seconds": time.perf_counter() - began,
        "step_seconds_median": statistics.median(timer.seconds),
        "peak_rss_above_start_mib": None if peak is None else (peak - rss_before) / 1024,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "log": history,
    }
    return trained, cost


def evaluate_folder(
    preset: Preset,
    work: Workspace,
    unit: Unit,
    folder: Path,
    *,
    vllm_python: str | None = None,
) -> dict[str, Any]:
    """``solopo-data evaluate`` of the model in ``folder`` on ``unit``'s split; returns the
    report (every answer)."""
    report_path = work.evaluation(unit.split, unit.model_key)
    answers = work.answers(unit.split, unit.model_key)
    argv = ["evaluate", "--output", str(report_path), "--answers", str(answers)]
    for path in split_contexts(preset, work, unit.split):
        argv += ["--input", str(path)]
    argv += ["--model", str(folder), "--dtype", "float32", "--quiet"]
    argv += ["--max-new-tokens", str(preset.answer_max_new_tokens)]
    if unit.split == "test" and preset.test_eval_questions is not None:
        argv += ["--limit", str(preset.test_eval_questions)]  # the first N rows of every length
    if vllm_python:
        argv += ["--backend", "vllm", "--batch-size", "64", *VLLM_ENGINE]
        command = [vllm_python, "-m", "solopo_kernels.data.cli", *argv]
        # vLLM logs to stdout: kept, so that an engine's death says why. One retry: the answers
        # resume, so a transient failure (an engine killed on a loaded machine) costs a restart.
        if subprocess.run(command, env=vllm_env(), cwd=REPO).returncode != 0:
            print(f"{unit.model_key}: the vLLM evaluation failed; resuming it once", flush=True)
            subprocess.run(command, check=True, env=vllm_env(), cwd=REPO)
    else:
        argv += ["--backend", "transformers", "--device", "cpu"]
        argv += ["--batch-size", str(preset.eval_batch_size)]
        run_cli(argv)
    return json.loads(report_path.read_text())


def _correct_strings(report: dict[str, Any]) -> dict[str, str]:
    """Per length label, one ``0``/``1`` per question in question order (for paired tests)."""
    by_length: dict[str, list[tuple[str, bool]]] = {}
    for answer in report["answers"]:
        by_length.setdefault(answer["length"], []).append((answer["example_id"], answer["correct"]))
    return {
        length: "".join(str(int(ok)) for _, ok in sorted(pairs))
        for length, pairs in by_length.items()
    }


def run_unit(
    unit: Unit, preset: Preset, work: Workspace, *, vllm_python: str | None = None
) -> dict[str, Any]:
    """Train (or reuse) and evaluate ``unit``; write and return its result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .pipeline import model_folder

    torch.manual_seed(unit.seed)
    base = model_folder(preset, work)
    adapter_dir = work.adapter(unit.model_key)
    cost_path = adapter_dir / "cost.json"
    cost: dict[str, Any] | None = None
    folder = base
    if unit.variant != "base":
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if cost_path.exists():
            from peft import PeftModel

            trained = PeftModel.from_pretrained(model, adapter_dir)
            cost = {**json.loads(cost_path.read_text()), "reused_adapter": True}
        else:
            trained, cost = train(unit, preset, work, model, tokenizer)
            trained.save_pretrained(adapter_dir)
            write_json(cost_path, cost)
        merged = trained.merge_and_unload()
        folder = work.root / "merged" / unit.model_key
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model, trained, merged
    began = time.perf_counter()
    try:
        report = evaluate_folder(preset, work, unit, folder, vllm_python=vllm_python)
    finally:
        if folder != base:
            shutil.rmtree(folder, ignore_errors=True)
    accuracy = {row["length"]: row["accuracy"] for row in report["accuracy"]}
    result = {
        "unit": {
            **asdict(unit),
            "arm": unit.arm,
            "alpha": unit.alpha,
            "ra_gradient": unit.ra_gradient,
        },
        "preset": preset.name,
        "fingerprint": preset.fingerprint(),
        "training": None
        if unit.variant == "base"
        else {
            "steps": cost["steps"],
            "batch_size": preset.batch_size,
            "learning_rate": unit.hparams["lr"],
            "lora_rank": preset.lora_rank,
            "bf16": preset.bf16,
            "beta": preset.beta,
            "gamma": preset.gamma,
        },
        "cost": cost,
        "eval_seconds": time.perf_counter() - began,
        "eval_backend": "vllm" if vllm_python else "transformers",
        "accuracy": accuracy,
        "stderr": {row["length"]: row["stderr"] for row in report["accuracy"]},
        "questions": {row["length"]: row["questions"] for row in report["accuracy"]},
        "correct": _correct_strings(report),
    }
    write_json(work.unit_result(unit.split, unit.model_key), result)
    return result


def init_worker(threads: int) -> None:
    """Worker set-up: few threads (the machine is shared) and nothing from a hub."""
    from replication.training import init_worker as init_tiny_worker

    init_tiny_worker(threads)


def run_unit_in_worker(
    unit: Unit, preset: Preset, work_root: str, results: str, vllm_python: str | None = None
) -> dict[str, Any]:
    """:func:`run_unit` for a process pool (paths as strings)."""
    return run_unit(
        unit, preset, Workspace(Path(work_root), Path(results)), vllm_python=vllm_python
    )
