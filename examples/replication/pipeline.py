"""The data side of the replication, run as a user would run it.

1. Questions: the procedural multi-hop QA task (:mod:`.qa_world`) in ``solopo-data``'s generic
   schema, a train, a dev and a test split.
2. Tokenizer: the package's word-level tiny tokenizer over the task's words.
3. Contexts: ``solopo-data build-contexts`` (its command-line entry point): the training
   questions at several long lengths (multi-scale), the dev and test questions once per
   evaluation length.
4. Starting model: a tiny Llama fine-tuned on short prompts until it answers a fair share of
   short dev questions, saved with ``save_pretrained``.
5. Pairs: ``solopo-data sample-pairs`` with that model on the training contexts: samples on the
   short prompts at temperature 0.85, judged by the sub-EM judge, no gold answer offered.

Every step writes its outputs under the work directory and is skipped when they exist, so a rerun
continues where the last one stopped.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from solopo_kernels.data.cli import main as solopo_data
from solopo_kernels.data.cli import tiny_tokenizer_for
from solopo_kernels.data.contexts import TEMPLATES
from solopo_kernels.tiny_models import tiny_llama

from .config import Preset
from .evaluation import evaluate_contexts, stop_token_ids
from .qa_world import Lexicon, make_split, write_split

SPLITS = ("train", "dev", "test")
TEMPLATE = TEMPLATES["cot"]


@dataclass(frozen=True)
class Workspace:
    """Where one preset's generated files live (``root``, not committed) and where its results go
    (``results``, committed for the full preset)."""

    root: Path
    results: Path

    def questions(self, split: str) -> Path:
        return self.root / "questions" / f"{split}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def contexts(self, split: str, length: int | None = None) -> Path:
        name = split if length is None else f"{split}-{length}"
        return self.root / "contexts" / f"{name}.jsonl"

    @property
    def starting_model(self) -> Path:
        return self.root / "starting-model"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs" / "train.jsonl"

    def model(self, key: str) -> Path:
        return self.root / "models" / f"{key}.pt"

    def unit_result(self, split: str, key: str) -> Path:
        return self.results / "units" / split / f"{key}.json"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON through a temporary file (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)


def _run_cli(argv: list[str]) -> None:
    status = solopo_data(argv)
    if status != 0:
        raise RuntimeError(f"solopo-data {' '.join(argv)} exited with status {status}")


def make_questions(preset: Preset, work: Workspace, lexicon: Lexicon) -> None:
    counts = {
        "train": preset.train_questions,
        "dev": preset.dev_questions,
        "test": preset.test_questions,
    }
    for split, count in counts.items():
        if not work.questions(split).exists():
            write_split(make_split(lexicon, split, count, preset.data_seed), work.questions(split))


def make_tokenizer(work: Workspace, lexicon: Lexicon) -> Any:
    """The word-level tokenizer over the templates' and the task's words (saved once)."""
    from transformers import AutoTokenizer

    if not (work.tokenizer / "tokenizer.json").exists():
        texts = [TEMPLATE.header, TEMPLATE.footer, *lexicon.words()]
        tiny_tokenizer_for(texts).save_pretrained(work.tokenizer)
    return AutoTokenizer.from_pretrained(work.tokenizer)


def build_contexts(preset: Preset, work: Workspace) -> None:
    """``solopo-data build-contexts`` for the training questions (multi-scale long targets) and
    for the dev and test questions (one file per evaluation length)."""
    jobs = [("train", None, preset.train_lengths)]
    jobs += [(split, n, (n,)) for split in ("dev", "test") for n in preset.eval_lengths]
    for split, length, targets in jobs:
        output = work.contexts(split, length)
        if output.exists():
            continue
        _run_cli(
            [
                "build-contexts",
                "--input",
                str(work.questions(split)),
                "--output",
                str(output),
                "--tokenizer",
                str(work.tokenizer),
                "--target-lengths",
                ",".join(map(str, targets)),
                "--template",
                TEMPLATE.name,
                "--seed",
                str(preset.data_seed),
            ]
        )


def eval_contexts(preset: Preset, work: Workspace, split: str) -> dict[str, list[dict[str, Any]]]:
    """The ``build-contexts`` rows of ``split`` per evaluation length (as a string)."""
    return {str(n): read_jsonl(work.contexts(split, n)) for n in preset.eval_lengths}


def short_chat_prompt(question: dict[str, Any]) -> list:
    """The short prompt ``build-contexts`` writes for a question (template, passages, question),
    built without a tokenizer: the fine-tuning stream needs thousands of them."""
    return chat_prompt(question, [], random.Random(0))


def chat_prompt(
    question: dict[str, Any], distractors: list[dict[str, Any]], rng: random.Random
) -> list:
    """The question's prompt with ``distractors`` (other people's biographies) mixed in at random
    places: a long context as ``build-contexts`` writes it, for the fine-tuning stream."""
    passages = [f"{p['title']}\n{p['text']}" for p in question["passages"]]
    for extra in distractors:
        passages.insert(rng.randrange(len(passages) + 1), f"{extra['title']}\n{extra['text']}")
    text, _ = TEMPLATE.user_text(passages, question["question"])
    return [{"role": "user", "content": text}]


def _sft_stream(lexicon: Lexicon, seed: int) -> Iterator[dict[str, Any]]:
    """Fresh fine-tuning questions forever: chunks of 1000, each with unique names."""
    for chunk in itertools.count():
        yield from make_split(lexicon, f"sft{chunk}", 1000, seed)


def _sft_batch(
    tokenizer: Any,
    questions: list[dict[str, Any]],
    rng: random.Random,
    max_distractors: int,
    long_fraction: float,
    completion_only: bool = False,
) -> dict[str, torch.Tensor]:
    """One fine-tuning batch: with probability ``long_fraction`` every question of the batch gets
    the same number (1 to ``max_distractors``, uniform) of other people's biographies, drawn from
    the batch's own questions (unique names within a stream chunk, so nothing contradicts the
    evidence); otherwise the short prompts. One distractor count per batch: little padding. With
    ``completion_only`` the loss is on the answer alone (the prompt's labels are ignored)."""
    if completion_only and tokenizer.padding_side != "right":
        raise ValueError("completion_only: expects a right-padding tokenizer (the prompt first)")
    count = (
        rng.randint(1, max_distractors) if max_distractors and rng.random() < long_fraction else 0
    )
    pool = [p for q in questions for p in (*q["passages"], *q["distractors"])]
    texts, prompt_lengths = [], []
    for question in questions:
        own = {p["title"] for p in question["passages"]}
        others = [p for p in pool if p["title"] not in own]
        prompt = chat_prompt(question, rng.sample(others, min(count, len(others))), rng)
        answer = {"role": "assistant", "content": question["reference"]}
        texts.append(tokenizer.apply_chat_template([*prompt, answer], tokenize=False))
        if completion_only:
            prompt_text = tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
            prompt_lengths.append(
                len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
            )
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, length in enumerate(prompt_lengths):  # right padding: the prompt comes first
        labels[row, :length] = -100
    batch["labels"] = labels
    return batch


def train_starting_model(preset: Preset, work: Workspace, lexicon: Lexicon, tokenizer: Any) -> dict:
    """Fine-tune the tiny Llama on short prompts (see :class:`.config.SFTConfig`); save it.

    Returns the record of the run (steps, checks, time), also written next to the model.
    """
    record_path = work.starting_model / "sft_record.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") != preset.fingerprint():
            raise RuntimeError(
                f"{work.starting_model}: trained for another preset (fingerprint "
                f"{record.get('fingerprint')}, this one {preset.fingerprint()}); delete the work "
                "directory or pick another --work-dir"
            )
        return record
    config, shape = preset.sft, preset.model
    torch.manual_seed(config.seed)
    longest = max(preset.eval_lengths) + preset.max_new_tokens + 8
    model = tiny_llama(
        tokenizer,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        max_position_embeddings=max(4096, longest),
        seed=config.seed,
    )
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    # The gate is checked at the longest training length, the curve at every eval length up to it
    # (the longer ones would cost more than the training steps between two checks).
    gate_length = str(max(preset.train_lengths))
    check_rows = {
        str(n): read_jsonl(work.contexts("dev", n))[: config.check_questions]
        for n in preset.eval_lengths
        if n <= int(gate_length)
    }
    if gate_length not in check_rows:
        raise ValueError(
            f"eval_lengths {preset.eval_lengths}: must hold the longest training length"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    stream = _sft_stream(lexicon, config.seed)
    rng = random.Random(config.seed)
    checks: list[dict[str, Any]] = []
    began = time.perf_counter()
    model.train()
    bar = tqdm(range(1, config.max_steps + 1), desc="fine-tune the starting model", unit="step")

    def passes(accuracy: dict[str, float]) -> bool:
        return (
            accuracy["short"] >= config.target_accuracy
            and accuracy[gate_length] >= config.target_long_accuracy
        )

    # Short prompts only until the short prompt reaches ``switch_accuracy`` once (when
    # ``short_first``), then the mix; ``mixed_from``: the last step before the mixed phase.
    mixed_from: int | None = None if config.short_first else 0
    for step in bar:
        questions = [next(stream) for _ in range(config.batch_size)]
        mixed = mixed_from is not None
        batch = _sft_batch(
            tokenizer,
            questions,
            rng,
            # (in the short phase the cap is unused: no batch is a long one)
            config.distractor_cap(step - mixed_from) if mixed else config.max_distractors,
            config.long_fraction if mixed else 0.0,
            config.completion_only and mixed,
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.check_every == 0 or step == config.max_steps:
            accuracy = evaluate_contexts(
                model,
                tokenizer,
                check_rows,
                max_new_tokens=preset.max_new_tokens,
                batch_size=preset.eval_batch_size,
            )["accuracy"]
            checks.append(
                {"step": step, "loss": loss.item(), "dev_accuracy": accuracy, "mixed": mixed}
            )
            if not mixed and accuracy["short"] >= config.switch_accuracy:
                mixed_from = step
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                short=f"{accuracy['short']:.2f}",
                **{f"at{gate_length}": f"{accuracy[gate_length]:.2f}"},
            )
            model.train()
            if passes(accuracy):
                break
    bar.close()
    model.save_pretrained(work.starting_model)
    tokenizer.save_pretrained(work.starting_model)
    record = {
        "fingerprint": preset.fingerprint(),
        "gate": {
            "length": int(gate_length),
            "short": config.target_accuracy,
            "long": config.target_long_accuracy,
            "met": passes(checks[-1]["dev_accuracy"]),
        },
        "config": asdict(config),
        "model": asdict(shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": checks[-1]["step"],
        "checks": checks,
        "seconds": time.perf_counter() - began,
    }
    write_json(record_path, record)
    return record


def sample_pairs(preset: Preset, work: Workspace) -> dict[str, Any]:
    """``solopo-data sample-pairs`` with the starting model; returns the counts of the run."""
    argv = [
        "sample-pairs",
        "--input",
        str(work.contexts("train")),
        "--output",
        str(work.pairs),
        "--model",
        str(work.starting_model),
        "--tokenizer",
        str(work.tokenizer),
        "--backend",
        "transformers",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--num-samples",
        str(preset.num_samples),
        "--temperature",
        str(preset.temperature),
        "--max-new-tokens",
        str(preset.max_new_tokens),
        "--batch-size",
        "16",
        "--seed",
        str(preset.data_seed),
        # Judge samples cut by --max-new-tokens too, as sample-pairs did when the committed
        # results were made (it now leaves them out unless asked): the same pairs as then.
        "--keep-truncated",
    ]
    if preset.include_gold:
        argv.append("--include-gold")
    # sample-pairs resumes by itself: rerunning the same command skips finished batches.
    _run_cli(argv)
    progress = read_jsonl(work.pairs.with_name(work.pairs.name + ".progress"))[1:]
    statuses = Counter(record["status"] for record in progress)
    pairs = read_jsonl(work.pairs)
    if not pairs:
        raise RuntimeError(f"{work.pairs}: sample-pairs wrote no pair; nothing to train on")
    correct = [record["num_correct"] for record in progress]
    return {
        "questions": len(progress),
        "pairs": len(pairs),
        "no_correct": statuses["no_correct"],
        "no_incorrect": statuses["no_incorrect"],
        "samples_per_question": preset.num_samples,
        "sample_accuracy": sum(correct) / (preset.num_samples * len(progress)),
        "chosen_from_gold": sum(row["metadata"]["chosen_source"] == "gold" for row in pairs),
        "pairs_by_target_length": dict(
            sorted(Counter(str(row["metadata"]["target_length"]) for row in pairs).items())
        ),
    }


def prepare(preset: Preset, work: Workspace) -> dict[str, Any]:
    """Run steps 1-5 (each skipped when its output exists); return their records."""
    random.seed(preset.data_seed)
    lexicon = Lexicon.build(seed=preset.data_seed)
    make_questions(preset, work, lexicon)
    tokenizer = make_tokenizer(work, lexicon)
    build_contexts(preset, work)
    sft = train_starting_model(preset, work, lexicon, tokenizer)
    if not sft["gate"]["met"]:
        # Without long-context reading there is nothing for SoLo-RA to align toward: the grid
        # would not test the method (docs/replication.md).
        curve = ", ".join(
            f"{c['step']}: {100 * c['dev_accuracy']['short']:.0f}% short / "
            f"{100 * c['dev_accuracy'][str(sft['gate']['length'])]:.0f}% at {sft['gate']['length']}"
            for c in sft["checks"][-4:]
        )
        raise RuntimeError(
            f"the starting model did not meet its dev gate (short >= {sft['gate']['short']:.0%}, "
            f"{sft['gate']['length']} tokens >= {sft['gate']['long']:.0%}) in "
            f"{preset.sft.max_steps} steps; last checks {curve}. Its record is in "
            f"{work.starting_model / 'sft_record.json'}; change SFTConfig and use a new --work-dir"
        )
    pairs = sample_pairs(preset, work)
    return {"starting_model": sft, "pairs": pairs}
