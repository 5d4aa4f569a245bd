"""Train a tiny Llama with SoLoPO on the CPU in about a minute, fully offline.

The task is fact lookup. The short prompt holds one fact and a question; the long prompt buries
the same fact among distractor facts about other people, items and places, and asks the same
question. Chosen answers name the right place, rejected ones a place from a distractor fact.

The model is built in code and first gets a few steps of plain supervised fine-tuning on the
*short* prompts only (a stand-in for an instruct model tuned on short contexts), so it answers
differently with and without the distractors. SoLoPO then trains the preference on the short
prompts and, through the SoLo-RA term, pulls the reward of the chosen answer under the long prompt
towards its reward under the short one. The script prints the objective on held-out pairs before
and after, then a verdict: which quantities moved the way training should move them (the loss and
the SoLo-RA distance down, the reward margin and accuracy up) and which did not.

    python examples/train_tiny_solopo.py                     # SoLo-SimPO, alpha 0.5, 60 steps
    python examples/train_tiny_solopo.py --loss-type dpo --alpha 1 --steps 60
    python examples/train_tiny_solopo.py --data demo/pairs.jsonl   # the output of `solopo-data`

With ``--data`` it trains on a JSONL file of ``prompt``, ``long_prompt``, ``chosen`` and
``rejected`` rows (standard or conversational, e.g. from ``solopo-data sample-pairs``) instead of
the synthetic task, with a word-level tokenizer over the file's words. A tenth of the rows is
held out, but at least 16 where that leaves three quarters for training (at least 2 in any case);
under 16 held-out pairs the verdict says the numbers are too few to mean much.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import tempfile
import textwrap
from typing import Any

# Nothing here comes from a hub; say so before transformers/datasets are imported.
for _var in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
):
    os.environ.setdefault(_var, "1")
# This example trains on the CPU: tell DeepSpeed so (accelerate imports it, when it is installed,
# the first time it unwraps a model; without CUDA it would log that it falls back to the CPU).
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

NAMES = "alice bob carol dave erin frank grace heidi ivan judy".split()
ITEMS = "key cup book lamp coin ring map hat".split()
PLACES = "kitchen garden attic cellar garage office hall porch library bakery".split()
GLUE = "put the in where did question answer".split()


def make_pairs(n: int, distractors: int, rng: random.Random) -> list[dict[str, str]]:
    """``n`` rows with ``prompt``, ``long_prompt``, ``chosen`` and ``rejected`` (TRL's standard
    preference format plus the long-prompt column)."""
    rows = []
    for _ in range(n):
        name, item, place = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(PLACES)
        facts = [(name, item, place)]
        while len(facts) < distractors + 1:  # no distractor answers the question
            fact = (rng.choice(NAMES), rng.choice(ITEMS), rng.choice(PLACES))
            if fact[:2] != (name, item):
                facts.append(fact)
        wrong = next(
            (f[2] for f in facts[1:] if f[2] != place),
            rng.choice([p for p in PLACES if p != place]),
        )
        question = f"question : where did {name} put the {item} ? answer :"
        sentences = [f"{a} put the {b} in the {c} ." for a, b, c in facts]
        relevant, others = sentences[0], sentences[1:]
        others.insert(rng.randrange(len(others) + 1), relevant)  # bury the relevant fact
        rows.append(
            {
                "prompt": f"{relevant} {question}",
                "long_prompt": " ".join(others) + f" {question}",
                "chosen": f" in the {place} .",
                "rejected": f" in the {wrong} .",
            }
        )
    return rows


#: Held-out pairs under which the verdict calls its numbers too few: with N pairs one pair moves
#: the accuracy by 1/N, and the means of the rewards are as noisy.
MIN_HELD_OUT = 16

#: What training should do to each evaluated quantity: +1 up, -1 down.
EXPECTED = {
    "loss": -1,
    "solo_ra/distance": -1,
    "rewards/margins": +1,
    "rewards/accuracies": +1,
}


def held_out_count(n_rows: int) -> int:
    """Rows of a ``--data`` file to hold out: a tenth, raised to :data:`MIN_HELD_OUT` where
    three quarters are left for training, and at least 2."""
    return max(2, min(max(n_rows // 10, MIN_HELD_OUT), n_rows // 4))


def verdict(
    before: dict[str, float], after: dict[str, float], loss_type: str, n_held_out: int
) -> list[str]:
    """Lines that say whether the run did what it should, from the held-out metrics before and
    after training (``trainer.evaluate()``'s ``eval_*`` keys)."""
    moved, missed, lines = [], [], []
    for key, sign in EXPECTED.items():
        start, end = before[f"eval_{key}"], after[f"eval_{key}"]
        if key == "rewards/accuracies" and start >= 1.0 and end >= 1.0:
            lines.append(
                "  rewards/accuracies was already 1.00 at the start (the warm-up already ranks "
                "every held-out chosen answer above its rejected one): nothing left to gain."
            )
            continue
        word = "down" if sign < 0 else "up"
        text = f"{key} {start:.4f} -> {end:.4f}"
        (moved if (end - start) * sign > 0 else missed).append(f"{text} (expected {word})")
    if moved:
        lines.insert(0, "  moved as expected: " + "; ".join(moved))
    if missed:
        lines.insert(int(bool(moved)), "  did NOT move as expected: " + "; ".join(missed))
    start, end = before["eval_rewards/chosen"], after["eval_rewards/chosen"]
    if end < start:
        lines.append(
            f"  rewards/chosen fell ({start:.4f} -> {end:.4f}), which is allowed: "
            f"{loss_type.upper()}'s preference term only asks the chosen reward to beat the "
            "rejected one, so training can lower both as long as the rejected reward falls "
            "faster (the margin is what must grow)."
        )
    if n_held_out < MIN_HELD_OUT:
        # Said first and in the headline: these moves are not evidence either way.
        lines.insert(
            0,
            f"  Only {n_held_out} held-out pairs: too few for these numbers to mean much (one "
            f"pair moves the accuracy by {1 / n_held_out:.2f}); use a file with at least "
            f"{4 * MIN_HELD_OUT} pairs. For the record:",
        )
        summary = f"none: {n_held_out} held-out pairs are too few to judge ({MIN_HELD_OUT} or more)"
    elif missed:
        summary = (
            f"{len(missed)} of the expected moves did not happen ({n_held_out} held-out pairs)"
        )
    else:
        summary = f"the run did what SoLoPO should ({n_held_out} held-out pairs)"
    return [f"Verdict: {summary}:", *lines]


def load_pairs(path: str) -> list[dict[str, Any]]:
    """The ``prompt``, ``long_prompt``, ``chosen`` and ``rejected`` columns of a JSONL file."""
    keys = ("prompt", "long_prompt", "chosen", "rejected")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} has no {', '.join(missing)} column")
    if len(rows) < 4:
        raise ValueError(f"{path}: expected at least 4 rows to train and hold out, got {len(rows)}")
    return [{k: row[k] for k in keys} for row in rows]


def as_text(
    tokenizer, value: str | list[dict[str, str]], *, generation_prompt: bool = False
) -> str:
    """A standard-format string as is; a conversational message list rendered by the chat template."""
    if isinstance(value, str):
        return value
    return tokenizer.apply_chat_template(
        value, tokenize=False, add_generation_prompt=generation_prompt
    )


def warm_up_on_short_prompts(
    model: torch.nn.Module, tokenizer, rows: list[dict[str, str]], steps: int
) -> None:
    """Plain next-token SFT on ``prompt + chosen`` (short prompts only)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = [
        (
            r["prompt"] + r["chosen"]
            if isinstance(r["prompt"], str)
            else as_text(tokenizer, r["prompt"] + r["chosen"])
        )
        + tokenizer.eos_token
        for r in rows
    ]
    model.train()
    for step in tqdm(range(steps), desc="warm-up SFT on short prompts"):
        batch = tokenizer(texts[(step * 16) % len(texts) :][:16], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loss-type", default="simpo", choices=["dpo", "ipo", "simpo", "orpo", "cpo"]
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="SoLo-RA weight")
    parser.add_argument(
        "--beta", type=float, default=None, help="default: 2.0 for simpo, 0.1 otherwise"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--distractors", type=int, default=5, help="distractor facts in each long prompt"
    )
    parser.add_argument("--ra-target", default="chosen", choices=["chosen", "both"])
    parser.add_argument(
        "--warmup-steps", type=int, default=200, help="SFT steps on short prompts first"
    )
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data", help="a JSONL file of preference pairs with a long_prompt column (see above)"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    if args.data:
        from solopo_kernels.data.cli import tiny_tokenizer_for

        rows = load_pairs(args.data)
        rng.shuffle(rows)
        n_held_out = held_out_count(len(rows))
        train, held_out = rows[n_held_out:], rows[:n_held_out]
        texts = [
            m["content"] if isinstance(m, dict) else m
            for row in rows
            for value in row.values()
            for m in ([value] if isinstance(value, str) else value)
        ]
        tokenizer = tiny_tokenizer_for(texts)
    else:
        tokenizer = tiny_tokenizer(NAMES + ITEMS + PLACES + GLUE)
        train = make_pairs(256, args.distractors, rng)
        held_out = make_pairs(32, args.distractors, rng)
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2, seed=args.seed)
    warm_up_on_short_prompts(model, tokenizer, train, steps=args.warmup_steps)

    def prompt_tokens(key: str) -> float:
        lengths = [
            len(tokenizer(text=as_text(tokenizer, r[key], generation_prompt=True))["input_ids"])
            for r in train
        ]
        return sum(lengths) / len(lengths)

    short_len, long_len = prompt_tokens("prompt"), prompt_tokens("long_prompt")
    print(
        f"prompts: {short_len:.0f} tokens short, {long_len:.0f} tokens long (rho = {short_len / long_len:.2f})"
    )

    with tempfile.TemporaryDirectory() as output_dir:
        config = SoLoPOConfig(
            output_dir=output_dir,
            solopo_loss_type=args.loss_type,
            solopo_alpha=args.alpha,
            solopo_ra_target=args.ra_target,
            beta=args.beta
            if args.beta is not None
            else (2.0 if args.loss_type == "simpo" else 0.1),
            # dpo/ipo on this tiny model: keep the reference out of SoLo-RA so that the distance
            # starts where the warm-up left it (with it, both sides start at exactly 0).
            solopo_ra_use_reference=False,
            max_steps=args.steps,
            per_device_train_batch_size=min(8, len(train)),
            # --data: the file's own lengths decide (the synthetic task is short anyway).
            max_length=None,
            per_device_eval_batch_size=16,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=10,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,  # tiny model: nothing to save
            report_to="none",
            save_strategy="no",
            seed=args.seed,
        )
        trainer = SoLoPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model) if args.loss_type in ("dpo", "ipo") else None,
            args=config,
            train_dataset=Dataset.from_list(train),
            eval_dataset=Dataset.from_list(held_out),
            processing_class=tokenizer,
        )
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()

    keys = [
        "loss",
        "solo_ra/distance",
        "rewards/chosen",
        "rewards/long_chosen",
        "rewards/margins",
        "rewards/accuracies",
    ]
    print(
        f"\nSoLo-{args.loss_type.upper()} (alpha={args.alpha}) on {len(held_out)} held-out pairs:"
    )
    print(f"  {'':22s}{'start':>10s}{'end':>10s}")
    for key in keys:
        print(f"  {key:22s}{before[f'eval_{key}']:10.4f}{after[f'eval_{key}']:10.4f}")
    print()
    for line in verdict(before, after, args.loss_type, len(held_out)):
        print(textwrap.fill(line, 100, subsequent_indent="    "))


if __name__ == "__main__":
    main()
