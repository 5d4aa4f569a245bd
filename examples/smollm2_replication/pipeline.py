"""The data side of the SmolLM2 replication, run as a user would run it.

1. Questions: one-hop biography questions (:mod:`.biographies`) in ``solopo-data``'s generic
   schema; train, dev and test splits, disjoint in people.
2. Model: SmolLM2-135M-Instruct's converted folder (:func:`solopo_kernels.pretrained.pretrained_path`),
   or, for the quick preset, a tiny random Llama saved in the work directory.
3. Contexts: ``solopo-data build-contexts`` with the model's tokenizer and chat template: the
   training questions at the training length, the dev and test questions once per evaluation
   length (the same short prompt in every file of a split).
4. Pairs: ``solopo-data sample-pairs`` with the model itself on the short training prompts:
   samples at temperature 0.85 judged by sub-EM, no gold answer.

Every step writes its outputs under the work directory and is skipped when they exist (the
sampler resumes by itself), so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solopo_kernels.data.cli import main as solopo_data

from .biographies import make_split, write_split
from .config import TINY_MODEL, Preset

SPLITS = ("train", "dev", "test")
REPO = Path(__file__).resolve().parents[2]
#: vLLM engine options of the commands run in a vLLM virtualenv: room for the longest prompt
#: plus its answer, no compilation (an engine starts per unit; eager answers were 4.6x faster
#: than transformers' in the pilot already), and the model run in the engine's own process: the
#: default executor gives up when one model step takes over VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS
#: (300 s), which a step of long prompts did on the shared machine at nice 19, twice (the engine
#: died with a TimeoutError in its message queue).
VLLM_ENGINE = (
    "--vllm-arg",
    "max_model_len=4096",
    "--vllm-arg",
    "enforce_eager=true",
    "--vllm-arg",
    "distributed_executor_backend=uni",
)


def vllm_env() -> dict[str, str]:
    """The environment of a command run in the vLLM virtualenv: this checkout's package, no
    hub, 4 GiB of KV cache and the engine's threads on every core this process may use, unless
    set; vLLM's warnings only."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # vLLM's automatic binding ("auto") keeps one core per worker for its scheduler process: on
    # two cores the model runs on one. Measured on 64 prompts of 1,024 tokens: 282 s with it,
    # 156 s bound to both cores (transformers, batch 8: 154 s), the same 64 answers.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


@dataclass(frozen=True)
class Workspace:
    """Where one preset's generated files live (``root``, not committed) and where its results
    go (``results``, committed for the full preset)."""

    root: Path
    results: Path

    def questions(self, split: str) -> Path:
        return self.root / "questions" / f"{split}.jsonl"

    @property
    def tiny_model(self) -> Path:
        return self.root / "tiny-model"

    def contexts(self, split: str, length: int) -> Path:
        return self.root / "contexts" / f"{split}-{length}.jsonl"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs" / "train.jsonl"

    def adapter(self, key: str) -> Path:
        return self.root / "adapters" / key

    def answers(self, split: str, key: str) -> Path:
        """The resumable answers of ``solopo-data evaluate`` for one unit."""
        return self.root / "answers" / split / f"{key}.jsonl"

    def unit_result(self, split: str, key: str) -> Path:
        return self.results / "units" / split / f"{key}.json"

    def evaluation(self, split: str, key: str) -> Path:
        """The unit's ``solopo-data evaluate`` report (every answer), committed."""
        return self.results / "answers" / split / f"{key}.json"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON through a temporary file (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)


def run_cli(argv: list[str]) -> None:
    status = solopo_data(argv)
    if status != 0:
        raise RuntimeError(f"solopo-data {' '.join(argv)} exited with status {status}")


def make_questions(preset: Preset, work: Workspace) -> None:
    counts = {
        "train": preset.train_questions,
        "dev": preset.dev_questions,
        "test": preset.test_questions,
    }
    for split, count in counts.items():
        if not work.questions(split).exists():
            rows = make_split(split, count, seed=preset.data_seed)
            write_split(rows, work.questions(split))


def model_folder(preset: Preset, work: Workspace) -> Path:
    """The model's Hugging Face folder: the converted pretrained model, or the quick preset's
    tiny random Llama (built once over the questions' words)."""
    if preset.model != TINY_MODEL:
        from solopo_kernels.pretrained import pretrained_path

        return pretrained_path(preset.model)
    folder = work.tiny_model
    if not (folder / "config.json").exists():
        from solopo_kernels.data.cli import tiny_tokenizer_for
        from solopo_kernels.data.contexts import TEMPLATES
        from solopo_kernels.tiny_models import tiny_llama

        template = TEMPLATES[preset.template]
        texts = [template.header, template.footer, "The answer is"]
        for split in SPLITS:
            for row in read_jsonl(work.questions(split)):
                texts += [row["question"], *row["answers"]]
                texts += [
                    f"{p['title']}\n{p['text']}" for p in (*row["passages"], *row["distractors"])
                ]
        tokenizer = tiny_tokenizer_for(texts)
        # head size 32: one of those vLLM's CPU attention supports (--vllm-python)
        model = tiny_llama(
            tokenizer, hidden_size=64, num_heads=2, num_kv_heads=1, max_position_embeddings=4096
        )
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def build_contexts(preset: Preset, work: Workspace, model: Path) -> None:
    """``solopo-data build-contexts`` for the training questions and, once per evaluation
    length, for the dev and test questions."""
    jobs = [("train", preset.train_length)]
    jobs += [("dev", n) for n in preset.dev_lengths] + [("test", n) for n in preset.test_lengths]
    for split, length in jobs:
        output = work.contexts(split, length)
        if output.exists():
            continue
        argv = ["build-contexts", "--input", str(work.questions(split)), "--output", str(output)]
        argv += ["--tokenizer", str(model), "--target-lengths", str(length)]
        argv += ["--template", preset.template, "--seed", str(preset.data_seed), "--quiet"]
        run_cli(argv)


def sample_pairs(
    preset: Preset, work: Workspace, model: Path, *, vllm_python: str | None = None
) -> dict[str, Any]:
    """``solopo-data sample-pairs`` with the model on the training contexts; returns the yield.

    With ``vllm_python`` (the interpreter of a virtualenv with vLLM) the command runs there
    with ``--backend vllm``; else in this process with the transformers backend. Resumable
    either way: rerunning the same command skips the finished batches.
    """
    argv = [
        "sample-pairs",
        "--input",
        str(work.contexts("train", preset.train_length)),
        "--output",
        str(work.pairs),
        "--model",
        str(model),
        "--dtype",
        "float32",
        "--num-samples",
        str(preset.num_samples),
        "--temperature",
        str(preset.temperature),
        "--max-new-tokens",
        str(preset.sample_max_new_tokens),
        "--batch-size",
        str(preset.sample_batch_size),
        "--seed",
        str(preset.data_seed),
    ]
    if preset.include_gold:
        argv.append("--include-gold")
    if preset.keep_truncated:
        argv.append("--keep-truncated")
    began = time.perf_counter()
    if vllm_python:
        argv += ["--backend", "vllm", *VLLM_ENGINE]
        command = [vllm_python, "-m", "solopo_kernels.data.cli", *argv]
        subprocess.run(command, check=True, env=vllm_env(), cwd=REPO)
    else:
        run_cli([*argv, "--backend", "transformers", "--device", "cpu"])
    seconds = time.perf_counter() - began
    progress = read_jsonl(work.pairs.with_name(work.pairs.name + ".progress"))[1:]
    pairs = read_jsonl(work.pairs)
    if not pairs:
        raise RuntimeError(f"{work.pairs}: sample-pairs wrote no pair; nothing to train on")
    statuses = Counter(record["status"] for record in progress)
    record_path = work.pairs.with_name("sampling.json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {"seconds": 0.0}
    record["seconds"] += seconds  # over every run that sampled (a resumed run adds its own)
    record.update(
        {
            "backend": "vllm" if vllm_python else "transformers",
            "questions": len(progress),
            "pairs": len(pairs),
            "yield": len(pairs) / len(progress),
            "no_correct": statuses["no_correct"],
            "no_incorrect": statuses["no_incorrect"],
            "samples_per_question": preset.num_samples,
            "sample_accuracy": sum(r["num_correct"] for r in progress)
            / (preset.num_samples * len(progress)),
            "chosen_from_gold": sum(row["metadata"]["chosen_source"] == "gold" for row in pairs),
            "load_average": os.getloadavg(),
        }
    )
    write_json(record_path, record)
    return record


def prepare(preset: Preset, work: Workspace, *, vllm_python: str | None = None) -> dict[str, Any]:
    """Steps 1-4 (each skipped when its output exists); returns the model folder and the yield."""
    make_questions(preset, work)
    model = model_folder(preset, work)
    build_contexts(preset, work, model)
    if work.pairs.with_name("sampling.json").exists() and _sampling_finished(preset, work):
        sampling = json.loads(work.pairs.with_name("sampling.json").read_text())
    else:
        sampling = sample_pairs(preset, work, model, vllm_python=vllm_python)
    # the pairs every arm trains on go with the results (a fresh machine copies them back into
    # WORK_DIR/pairs/ to train on exactly these)
    kept = work.results / "pairs"
    kept.mkdir(parents=True, exist_ok=True)
    for name in (work.pairs.name, work.pairs.name + ".progress", "sampling.json"):
        shutil.copyfile(work.pairs.with_name(name), kept / name)
    return {"model": str(model), "sampling": sampling}


def _sampling_finished(preset: Preset, work: Workspace) -> bool:
    progress = work.pairs.with_name(work.pairs.name + ".progress")
    return progress.exists() and len(read_jsonl(progress)) - 1 >= preset.train_questions


def split_contexts(preset: Preset, work: Workspace, split: str) -> list[Path]:
    """The context files of ``split``, one per evaluation length."""
    lengths = preset.dev_lengths if split == "dev" else preset.test_lengths
    return [work.contexts(split, n) for n in lengths]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run examples/replicate_smollm2.py")
