"""A whole training step on real pretrained models: SoLoPO with this package against TRL's
``DPOTrainer`` on the same pairs placed in the long context (expand-long, the paper's baseline),
plain and with ``use_liger_kernel=True``, side by side in one run.

    python benchmarks/run_real_step.py                 # SmolLM2-135M + Gemma-3-270M, 1K-8K (Gemma to 16K), cap 12 GiB
    python benchmarks/run_real_step.py --preset tiny   # the plumbing, on a tiny Llama saved to disk (about a minute)

Methods (one pair per step, float32, full fine-tuning with AdamW, a frozen reference model, no
gradient checkpointing unless ``--gradient-checkpointing``):

* ``solopo``: ``SoLoPOTrainer``, SoLo-DPO (alpha 3, beta 0.1): the policy and the reference on
  the short pair and on the long chosen row; log-probs by this package's kernel;
* ``trl-dpo``: TRL's ``DPOTrainer`` with the long prompt as the prompt: the policy and the
  reference on the long pair (TRL 1.16 computes its log-probs with its own chunked LM head);
* ``trl-dpo-liger``: the same with ``use_liger_kernel=True`` (Liger's layer kernels: RMSNorm,
  SwiGLU, RoPE). They are Triton kernels and need a CUDA device: unavailable on the CPU.

A step is ``trainer.training_step`` (forwards, loss, backward) then ``optimizer.step()``, after
one warm-up step that also creates AdamW's state. The pairs: one question ("Which company does
<name> work for?") whose short prompt is its biography alone and whose long prompt buries that
biography among look-alike biographies, built by this package's ``ContextBuilder`` with the
model's own tokenizer at each long length (SmolLM2: its chat template; Gemma, a base model:
plain text ending in "Answer:"); chosen "The answer is <company>.", rejected "The answer is
<another company>.". Long rows are at most ``L`` tokens (prompt + response).

Memory (``harness.py``): the peak RSS of the method's process during the step (CPU; the CUDA
allocator's peak on a GPU), reported above the pre-step baseline (weights, reference, AdamW state,
batch) and as a whole (baseline + step). A method trains a length within the cap when the whole
peak is at most ``--cap-gb``; a step beyond 90 % of the machine's available memory fails as OOM
(on a GPU, ``torch.cuda.set_per_process_memory_fraction`` holds the method to the cap).

Writes ``real_step.json`` (every figure), ``real_step.md`` (the report) and ``real_step.png``
(time and memory against length, one column per model) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import Cell, CellResult, Unavailable, run_grid

HERE = Path(__file__).resolve().parent
METHODS = ("solopo", "trl-dpo", "trl-dpo-liger")
LABELS = {
    "solopo": "SoLoPO (this package)",
    "trl-dpo": "TRL DPOTrainer expand-long",
    "trl-dpo-liger": "TRL DPOTrainer expand-long + Liger",
}
ALPHA, BETA = 3.0, 0.1  # the paper's SoLo-DPO setting
#: Tokens kept free for the response after the long prompt (the answers are about 10 tokens).
RESPONSE_ROOM = 48
#: name -> (lengths, chat format): SmolLM2 has 8,192 positions, Gemma 3 32,768.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {"lengths": [1024, 2048, 4096, 8192], "format": "conversational"},
    "gemma-3-270m": {"lengths": [1024, 2048, 4096, 8192, 16384], "format": "standard"},
}
TINY = {"lengths": [256, 512], "format": "conversational"}


# ---------------------------------------------------------------------------------------- data
def biographies(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``count`` distinct (name, city, company) triples: the look-alike biographies."""
    rng = random.Random(seed)
    first = (
        "Maria Tomas Anna Kenji Lena Omar Ines Pavel Sofia Ravi Clara Mateo Yara Felix Nora "
        "Hugo Amira Jonas Elena Diego Mina Oskar Leila Bruno Hana Marco Zoe Ivan Alma Theo"
    ).split()
    last = (
        "Okafor Reyes Weber Sato Holm Haddad Duarte Novak Lindqvist Moreau Kowalski Tanaka "
        "Fischer Costa Nilsen Petrov Ibarra Keller Varga Rossi Mendes Larsen Dubois Yilmaz "
        "Horvat Silva Ortega Berg Quinn Adler"
    ).split()
    cities = (
        "Lisbon Quito Graz Osaka Bergen Tunis Porto Brno Lyon Pune Gdansk Cusco Malmo Izmir "
        "Split Leeds Bremen Kyoto Perth Tartu"
    ).split()
    brands = (
        "Northwind Bluefield Orchid Ridgeway Cobalt Saffron Atlas Vega Harbor Juniper Summit "
        "Falcon Meridian Pioneer Sterling Aurora Granite Willow Beacon Crescent"
    ).split()
    trades = "Shipping Bank Pharma Motors Mining Foods Textiles Software Airlines Energy".split()
    kinds = "Group Holdings Labs Partners Works".split()
    names = [f"{a} {b}" for a in first for b in last]
    companies = [f"{a} {b} {c}" for a in brands for b in trades for c in kinds]
    rng.shuffle(names)
    rng.shuffle(companies)
    people = [(names[i], rng.choice(cities), companies[i]) for i in range(min(count, len(names)))]
    # Past the 900 plain names (Gemma's 16K row needs more look-alikes): the same names with a
    # middle initial, each with a company of its own; the first 900 people stay as they were,
    # so the shorter rows' pairs do not change.
    initials = "ABCDEFGHJKLMNPRSTVW"
    extra = [f"{n.split()[0]} {i}. {n.split()[1]}" for i in initials for n in names]
    extra_companies = [f"{c} {s}" for s in ("International", "Global", "Europe") for c in companies]
    if count > len(names) + min(len(extra), len(extra_companies)):
        raise ValueError(f"count: at most {len(names) + len(extra_companies)}, got {count}")
    for i in range(count - len(people)):
        people.append((extra[i], rng.choice(cities), extra_companies[i]))
    return people


def make_pair(tokenizer: Any, chat_format: str, long_length: int) -> dict[str, Any]:
    """One preference pair at ``long_length``: ``prompt`` (short), ``long_prompt``, ``chosen``,
    ``rejected`` (TRL's format, conversational or standard), and ``metadata`` (lengths)."""
    from solopo_kernels.data.contexts import (
        TEMPLATES,
        ContextBuilder,
        DistractorPool,
        TargetLengths,
    )
    from solopo_kernels.data.readers import Passage, QAExample

    # About 18 tokens per biography: enough look-alikes for the row, whatever the tokenizer
    people = biographies(max(900, long_length // 12))
    examples = [
        QAExample(
            id=f"bio{i}",
            question=f"Which company does {name} work for?",
            answers=(company,),
            passages=(Passage("", f"{name} was born in {city}. {name} works for {company}."),),
        )
        for i, (name, city, company) in enumerate(people)
    ]
    builder = ContextBuilder(
        tokenizer, DistractorPool(examples), template=TEMPLATES["qa"], prompt_format=chat_format
    )
    row = builder.build(examples[0], TargetLengths([long_length - RESPONSE_ROOM]))
    chosen, rejected = f"The answer is {people[0][2]}.", f"The answer is {people[1][2]}."
    if chat_format == "conversational":
        chosen_value: Any = [{"role": "assistant", "content": chosen}]
        rejected_value: Any = [{"role": "assistant", "content": rejected}]
    else:
        chosen_value, rejected_value = f" {chosen}", f" {rejected}"
    return {
        "prompt": row["prompt"],
        "long_prompt": row["long_prompt"],
        "chosen": chosen_value,
        "rejected": rejected_value,
        "metadata": row["metadata"],
    }


# ------------------------------------------------------------------------------- the harness side
@functools.cache
def _tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@functools.cache
def _pair(folder: str, chat_format: str, long_length: int) -> dict[str, Any]:
    return make_pair(_tokenizer(folder), chat_format, long_length)


def build_cell(name: str, cell: dict[str, Any], device: Any, seed: int) -> Cell:
    """The harness entry point (``registry="run_real_step"``): method ``name`` at ``cell``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    if name == "trl-dpo-liger" and device.type != "cuda":
        raise Unavailable(
            "use_liger_kernel=True swaps in Liger's Triton layer kernels, which need a CUDA "
            "device (on the CPU the first forward fails: no Triton driver)"
        )
    if device.type == "cuda" and cell.get("cap_bytes"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cell["cap_bytes"] / total), device)
    folder = cell["folder"]
    tokenizer = _tokenizer(folder)
    pair = _pair(folder, cell["format"], cell["long_length"])
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="real-step-"),
        beta=BETA,
        max_length=None,  # no truncation: every row whole
        per_device_train_batch_size=1,
        gradient_checkpointing=cell["gradient_checkpointing"],
        learning_rate=1e-6,
        use_cpu=device.type != "cuda",
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    if name == "solopo":
        from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer

        args = SoLoPOConfig(
            solopo_loss_type="dpo", solopo_alpha=ALPHA, max_long_length=None, **common
        )
        row = {key: pair[key] for key in ("prompt", "long_prompt", "chosen", "rejected")}
        trainer_class: Any = SoLoPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(use_liger_kernel=name == "trl-dpo-liger", **common)
        row = {
            "prompt": pair["long_prompt"],
            "chosen": pair["chosen"],
            "rejected": pair["rejected"],
        }
        trainer_class = DPOTrainer
    trainer = trainer_class(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list([row]),
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    optimizer = trainer.create_optimizer()
    # What train() sets before its first training_step (one batch per optimizer step).
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> Any:
        model.train()
        loss = trainer.training_step(model, batch)
        optimizer.step()
        return loss.detach()

    return Cell(step, params, (name, cell["model"], cell["long_length"]))


# ---------------------------------------------------------------------------------- the report
def fits(result: CellResult, cap_bytes: int) -> bool:
    """Whether the step ran and its whole peak (baseline + step) is at most ``cap_bytes``."""
    return (
        result.status == "ok"
        and result.peak_bytes is not None
        and result.baseline_bytes + result.peak_bytes <= cap_bytes
    )


def _gib(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def report_tables(
    cells: list[dict[str, Any]], results: dict[tuple[int, str], CellResult], cap_bytes: int
) -> str:
    """Per model: a table of step time and memory by length and method, the SoLoPO / best-TRL
    ratios, and the longest length each method trains within the cap."""
    lines: list[str] = []
    for model in dict.fromkeys(cell["model"] for cell in cells):
        indices = [i for i, cell in enumerate(cells) if cell["model"] == model]
        lines += [
            f"### {model}",
            "",
            "| long row L | short / long tokens | "
            + " | ".join(f"{LABELS[m]}: time; step peak (whole)" for m in METHODS)
            + " | SoLoPO / best TRL: time | memory (whole) |",
            "|" + "---|" * (len(METHODS) + 4),
        ]
        for i in indices:
            cell = cells[i]
            figures = []
            for method in METHODS:
                r = results[i, method]
                if r.status == "ok":
                    figures.append(
                        f"{r.median_s:.1f} s; {_gib(r.peak_bytes)} "
                        f"({_gib(r.baseline_bytes + r.peak_bytes)})"
                    )
                else:
                    figures.append(r.status)
            ours = results[i, "solopo"]
            trl = [results[i, m] for m in METHODS[1:] if results[i, m].status == "ok"]
            if ours.status == "ok" and trl:
                best_time = min(r.median_s for r in trl)
                best_mem = min(r.baseline_bytes + r.peak_bytes for r in trl)
                ratios = [
                    f"{ours.median_s / best_time:.2f}",
                    f"{(ours.baseline_bytes + ours.peak_bytes) / best_mem:.2f}",
                ]
            else:
                ratios = ["n/a", "n/a"]
            lengths = f"{cell['short_tokens']} / {cell['long_tokens']}"
            lines.append(
                f"| {cell['long_length']} | {lengths} | " + " | ".join(figures + ratios) + " |"
            )
        lines += ["", f"Longest long row trained within {_gib(cap_bytes)} (whole process):", ""]
        for method in METHODS:
            statuses = {results[i, method].status for i in indices}
            if statuses == {"unavailable"}:
                lines.append(
                    f"- {LABELS[method]}: unavailable here ({results[indices[0], method].reason})"
                )
                continue
            trained = [
                cells[i]["long_length"] for i in indices if fits(results[i, method], cap_bytes)
            ]
            longest = max(trained, default=None)
            beyond = longest == max(cells[i]["long_length"] for i in indices)
            lines.append(
                f"- {LABELS[method]}: {longest if longest else 'none of the measured lengths'}"
                + (" (the longest measured: its limit may be higher)" if beyond else "")
            )
        lines.append("")
    return "\n".join(lines)


def plot(
    cells: list[dict[str, Any]], results: dict[tuple[int, str], CellResult], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(cell["model"] for cell in cells))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    for column, model in enumerate(models):
        indices = [i for i, cell in enumerate(cells) if cell["model"] == model]
        for m_index, method in enumerate(METHODS):
            points = [(cells[i]["long_length"], results[i, method]) for i in indices]
            points = [(x, r) for x, r in points if r.status == "ok"]
            if not points:
                continue
            xs = [x for x, _ in points]
            style = dict(marker="o", color=f"C{m_index}", label=LABELS[method])
            axes[0][column].plot(xs, [r.median_s for _, r in points], **style)
            whole = [(r.baseline_bytes + r.peak_bytes) / 2**30 for _, r in points]
            axes[1][column].plot(xs, whole, **style)
        for row, ylabel in enumerate(("step time (s)", "peak memory, whole process (GiB)")):
            ax = axes[row][column]
            ax.set_xscale("log", base=2)
            ax.set_xticks([cells[i]["long_length"] for i in indices])
            ax.set_xticklabels([str(cells[i]["long_length"]) for i in indices])
            ax.set_xlabel("long row length L (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(model, fontsize=10)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a run where every cell failed has none
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the command
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["real", "tiny"], default="real")
    parser.add_argument(
        "--models", default=",".join(PRESETS), help="comma-separated models (the real preset)"
    )
    parser.add_argument(
        "--lengths", default=None, help="comma-separated long row lengths (default: per model)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--cap-gb", type=float, default=12.0, help="the memory cap, GiB")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per method and length")
    parser.add_argument("--time-budget", type=float, default=300.0, dest="time_budget_s")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tmp" / "real-step")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.threads = args.threads or torch.get_num_threads()
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    return args


def tiny_folder(directory: Path) -> Path:
    """A tiny random Llama and a word-level tokenizer with a chat template, saved as a folder:
    the real path's code on a model that steps in a fraction of a second."""
    from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer

    words = {w.lower() for triple in biographies(900) for part in triple for w in part.split()}
    words |= set("was born in works for which company does work the answer is".split())
    words |= set(
        "only give me and do not output any other words following are given passages question based on".split()
    )
    tokenizer = tiny_tokenizer(sorted(words))
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, max_position_embeddings=1024)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One cell per (model, long length)."""
    if args.preset == "tiny":
        folder = tiny_folder(Path(tempfile.mkdtemp(prefix="tiny-llama-")))
        sources = {"tiny-llama": (folder, TINY)}
    else:
        from solopo_kernels.pretrained import pretrained_path

        names = [m for m in args.models.split(",") if m]
        sources = {name: (pretrained_path(name), PRESETS[name]) for name in names}
    cells = []
    for model, (folder, preset) in sources.items():
        for length in args.lengths or preset["lengths"]:
            pair = make_pair(_tokenizer(str(folder)), preset["format"], length)
            cells.append(
                {
                    "model": model,
                    "folder": str(folder),
                    "format": preset["format"],
                    "long_length": length,
                    "short_tokens": pair["metadata"]["short_length"],
                    "long_tokens": pair["metadata"]["long_length"],
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "cap_bytes": int(args.cap_gb * 2**30),
                    # The sizes harness.dominates() compares: an OOM at L skips longer L.
                    "kind": model,
                    "positions": length,
                    "response_tokens": 1,
                    "hidden": 1,
                    "vocab": 1,
                    "pairs": 1,
                }
            )
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    from run_memory import available_memory_bytes, environment
    from tqdm import tqdm

    args = parse_args(argv)
    cells = make_cells(args)
    cap = int(args.cap_gb * 2**30)
    started = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bar = tqdm(
        total=len(cells) * len(args.methods), desc="real steps", unit="cell", file=sys.stderr
    )

    def progress(index: int, method: str, result: CellResult) -> None:
        cell = cells[index]
        bar.set_postfix_str(f"{cell['model']} L={cell['long_length']} | {method}: {result.status}")
        bar.update()

    results = run_grid(
        "run_real_step",
        args.methods,
        cells,
        device=args.device,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        time_budget_s=args.time_budget_s,
        # Protects the machine: a step beyond 90% of the available RAM fails as "OOM".
        mem_limit_bytes=None
        if args.device.startswith("cuda")
        else int(0.9 * available_memory_bytes()),
        timeout_s=args.timeout,
        on_result=progress,
    )
    bar.close()
    for index, _ in enumerate(cells):  # methods left out of --methods: not measured
        for method in METHODS:
            results.setdefault((index, method), CellResult("unavailable", reason="not selected"))
    elapsed = time.perf_counter() - started
    env = environment(args.device, args.threads) | {"load_average_1min_at_start": load_start}
    import trl

    load_text = (
        f"load average {load_start:.1f} at the start, {env['load_average_1min']:.1f} at the end"
        if load_start is not None
        else "load average unknown"
    )
    text = "\n".join(
        [
            f"## A whole training step on real models: SoLoPO vs TRL DPOTrainer expand-long ({args.device})",
            "",
            f"One pair per step, float32, full fine-tuning (AdamW), a reference model, gradient "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; SoLo-DPO alpha "
            f"{ALPHA:g}, beta {BETA:g}. Machine: {env['device_name']}, {args.threads} threads; "
            f"torch {env['versions']['torch']}, TRL {trl.__version__}; {env['date']}; {load_text}. "
            f"Time: median of up to {args.repeats} steps after {args.warmup} warm-up step, "
            "methods interleaved. Memory: peak of the step above the baseline (weights, "
            "reference, AdamW state, batch), and in brackets the whole process (baseline + step).",
            "",
            report_tables(cells, results, cap),
            "The goal: at most 0.6x the time and 0.5x the peak memory of the best TRL "
            "setup at every length, and at least twice its longest trainable length. The paper "
            "(Qwen2.5-7B, GPUs): trainable length 9K -> 19K tokens, 26-52 % less time per step.",
            "",
            f"Measured in {elapsed / 60:.1f} min.",
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        "cells": [
            {"cell": {k: v for k, v in cells[i].items() if k != "folder"}, "method": m}
            | r.as_dict()
            | {"whole_peak_bytes": (r.baseline_bytes or 0) + (r.peak_bytes or 0) or None}
            for (i, m), r in sorted(results.items())
        ],
    }
    (args.out / "real_step.json").write_text(json.dumps(payload, indent=1))
    (args.out / "real_step.md").write_text(text + "\n")
    if not args.no_plot:
        plot(cells, results, args.out / "real_step.png")
    print(
        f"\nWrote {args.out}/real_step.{{json,md{'' if args.no_plot else ',png'}}}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
