"""Cost of sampling preference pairs on the short prompts vs on the long prompts (SoLoPO's data side).

SoLoPO samples and judges responses on ``x_short`` only; vanilla long-context preference
optimization would sample them on ``x_long``. This script builds the short/long contexts of the
bundled MuSiQue-schema sample with multi-scale target lengths, then runs the package's own pair
sampler (``sample_pairs`` with the transformers backend) on the same tiny random Llama twice:
once on the short prompts and once on the long prompts (the long prompt put in the ``prompt``
column), with the same seed, number of samples and response budget. It prints

* the length distribution that multi-scale sampling produced (per target length: count, mean /
  min / max long-prompt tokens, mean short-prompt tokens, mean rho), and
* per prompt set (short; long per target length; long overall): wall time of generation,
  prompt tokens (each prompt once), prompt tokens that ``transformers.generate`` processes (it
  repeats each prompt once per sample), generated tokens, and the long/short ratios.

The model is random and tiny (about 0.1M parameters), so its absolute times say little about a 7B
model; the ratios show how the cost grows with the prompt, which is the data-efficiency argument.
Offline, CPU only:

    python benchmarks/data_sampling_cost.py                       # the figures quoted in the issue
    python benchmarks/data_sampling_cost.py --num-samples 4 --limit 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from solopo_kernels.data import (  # noqa: E402
    SamplingConfig,
    TargetLengths,
    TransformersBackend,
    build_contexts,
    format_summary,
    read_examples,
    sample_pairs,
    summarize_lengths,
)
from solopo_kernels.data.cli import SAMPLE_PATH, tiny_tokenizer_for  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama  # noqa: E402


def measure(
    row: dict[str, Any], backend: Any, tokenizer: Any, config: SamplingConfig, repeats: int
) -> dict[str, Any]:
    """Run the pair sampler on one row ``repeats`` times; return its cost figures, with the
    fastest run's seconds (the runs are seeded alike, so their tokens are equal)."""
    seconds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as scratch:
            output = Path(scratch) / "pairs.jsonl"
            summary = sample_pairs([row], backend, tokenizer, output, config=config, progress=False)
        seconds.append(summary.seconds)
    return {
        "examples": 1,
        "seconds": min(seconds),
        "prompt_tokens": summary.prompt_tokens,
        "prefill_tokens": summary.prompt_tokens * config.num_samples,
        "generated_tokens": summary.generated_tokens,
    }


def total(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise sums of :func:`measure` results."""
    return {key: sum(part[key] for part in parts) for key in parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", default=str(SAMPLE_PATH), help="MuSiQue or generic QA JSONL")
    parser.add_argument(
        "--target-lengths", default="1k,2k,4k", help="multi-scale long-prompt lengths"
    )
    parser.add_argument("--num-samples", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="response budget")
    parser.add_argument(
        "--limit", type=int, default=None, help="only sample on the first N examples"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for contexts and sampling")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per set; the fastest counts"
    )
    parser.add_argument("--hidden-size", type=int, default=32, help="tiny Llama width")
    parser.add_argument("--layers", type=int, default=2, help="tiny Llama depth")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is steadiest on a shared machine)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    examples = read_examples(args.input)
    texts = [example.question for example in examples] + ["The answer is", "Answer:"]
    texts += [p.render() for example in examples for p in (*example.passages, *example.distractors)]
    tokenizer = tiny_tokenizer_for(texts)
    lengths = TargetLengths.parse(args.target_lengths)
    rows = build_contexts(examples, tokenizer, lengths, seed=args.seed, progress=False)
    rows = rows[: args.limit]  # the pool still holds every example's passages
    summary = summarize_lengths(rows)
    print(
        f"Length distribution ({len(rows)} examples, targets {args.target_lengths}, tiny tokenizer):"
    )
    print(format_summary(summary))

    longest = max(row["metadata"]["long_length"] for row in rows) + 64
    model = tiny_llama(
        tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        max_position_embeddings=longest + args.max_new_tokens,
    )
    backend = TransformersBackend(model, tokenizer)
    # One prompt per generate call: no padding, and the same work for both prompt sets.
    config = SamplingConfig(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=1,
        seed=args.seed,
    )
    measure(rows[0], backend, tokenizer, config, 1)  # warm-up
    # Short and long runs alternate example by example, so that both see the same machine load.
    per_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        target = row["metadata"]["target_length"]
        per_row[f"short ({target})"].append(measure(row, backend, tokenizer, config, args.repeats))
        long_row = {**row, "prompt": row["long_prompt"]}
        per_row[f"long ({target})"].append(
            measure(long_row, backend, tokenizer, config, args.repeats)
        )
    targets = sorted({row["metadata"]["target_length"] for row in rows})
    results = {
        f"{side} ({target})": total(per_row[f"{side} ({target})"])
        for target in targets
        for side in ("short", "long")
    }
    for side in ("short", "long"):
        results[f"{side} (all)"] = total([results[f"{side} ({target})"] for target in targets])

    print(
        f"\nSampling cost, {args.num_samples} samples x up to {args.max_new_tokens} new tokens per "
        f"prompt, tiny Llama ({sum(p.numel() for p in model.parameters())} parameters) on "
        f"{torch.get_num_threads()} CPU threads, transformers generate, fastest of {args.repeats} per example:"
    )
    header = f"{'prompts':>13} {'examples':>8} {'seconds':>8} {'prompt tok':>10} {'prefill tok':>11} {'new tok':>8} {'ms/new tok':>10}"
    print(header)
    for name, figures in results.items():
        print(
            f"{name:>13} {figures['examples']:>8} {figures['seconds']:>8.2f} "
            f"{figures['prompt_tokens']:>10} {figures['prefill_tokens']:>11} "
            f"{figures['generated_tokens']:>8} "
            f"{1000 * figures['seconds'] / max(1, figures['generated_tokens']):>10.2f}"
        )
    short, long = results["short (all)"], results["long (all)"]
    print(
        f"\nlong / short: wall time x{long['seconds'] / short['seconds']:.1f}, prompt tokens "
        f"x{long['prompt_tokens'] / short['prompt_tokens']:.1f}, per generated token "
        f"x{(long['seconds'] / long['generated_tokens']) / (short['seconds'] / short['generated_tokens']):.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"lengths": summary, "cost": results}, indent=2))


if __name__ == "__main__":
    main()
