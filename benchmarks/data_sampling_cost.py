"""Cost of sampling preference pairs: on the short prompts vs on the long prompts (SoLoPO's data
side), and with ``transformers.generate`` vs vLLM (with and without prefix caching).

SoLoPO samples and judges responses on ``x_short`` only; vanilla long-context preference
optimization would sample them on ``x_long``. This script builds the short/long contexts of the
bundled MuSiQue-schema sample with multi-scale target lengths, then runs the package's own pair
sampler (``sample_pairs``) on the same tiny random Llama, once per backend and prompt set (the
long prompt put in the ``prompt`` column), with the same seed, number of samples and response
budget, one prompt per generation call. Backends (``--backends``):

* ``transformers``: ``model.generate``; it repeats each prompt once per sample, so it computes
  ``prompt tokens x samples`` prompt tokens;
* ``vllm``: vLLM's offline engine on the same weights (saved to a temporary directory with
  ``save_pretrained``), eager mode, prefix caching on (vLLM's default): the samples of a prompt
  share its cached blocks;
* ``vllm-no-cache``: the same with ``enable_prefix_caching=False``.

It prints the length distribution that multi-scale sampling produced, then per backend and
prompt set (short; long per target length; both overall): wall time of generation, prompt tokens
(each prompt once), prompt tokens computed (less the prefix-cache hits that vLLM reports),
generated tokens and generated tokens per second, and the long/short and backend ratios.

The model is random and tiny, so its absolute times say little about a 7B model on a GPU; the
ratios show how the cost grows with the prompt and what prefix sharing saves. vLLM's engine
starts in a spawned process (this file has the ``__main__`` guard that needs) and binds its
OpenMP threads itself (one core on a 2-core machine, ``VLLM_CPU_OMP_THREADS_BIND``); keep
``--threads 1`` for transformers to compare like with like. Offline, CPU only:

    python benchmarks/data_sampling_cost.py                         # transformers only
    python benchmarks/data_sampling_cost.py --backends transformers,vllm,vllm-no-cache
    python benchmarks/data_sampling_cost.py --num-samples 4 --limit 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One GiB of KV cache is plenty for the tiny model (vLLM's CPU default takes far more).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

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

BACKENDS = ("transformers", "vllm", "vllm-no-cache")


def measure(
    row: dict[str, Any],
    backend: Any,
    tokenizer: Any,
    config: SamplingConfig,
    repeats: int,
    reset: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run the pair sampler on one row ``repeats`` times; return its cost figures, with the
    fastest run's seconds (the runs are seeded alike, so their tokens are equal). ``reset``
    runs before each run (vLLM: empty the prefix cache, so that a repeat does not reuse the
    previous run's blocks)."""
    seconds = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        with tempfile.TemporaryDirectory() as scratch:
            output = Path(scratch) / "pairs.jsonl"
            summary = sample_pairs([row], backend, tokenizer, output, config=config, progress=False)
        seconds.append(summary.seconds)
    copies = summary.prompt_tokens * config.num_samples
    return {
        "examples": 1,
        "seconds": min(seconds),
        "prompt_tokens": summary.prompt_tokens,
        "computed_prompt_tokens": copies - (summary.cached_prompt_tokens or 0),
        "generated_tokens": summary.generated_tokens,
    }


def total(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise sums of :func:`measure` results."""
    return {key: sum(part[key] for part in parts) for key in parts[0]}


def load(name: str, model: Any, tokenizer: Any, model_dir: Path | None) -> tuple[Any, Any]:
    """The backend ``name`` on ``model``'s weights, and its reset callable (or None)."""
    if name == "transformers":
        return TransformersBackend(model, tokenizer), None
    from solopo_kernels.data import VLLMBackend

    backend = VLLMBackend(
        str(model_dir),
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=name == "vllm",
    )
    return backend, backend.llm.reset_prefix_cache


def run_backend(
    name: str, rows: list[dict[str, Any]], backend: Any, reset: Any, tokenizer: Any, args: Any
) -> dict[str, dict[str, Any]]:
    """Short and long cost figures of one backend, per target length and overall."""
    # One prompt per generate call: no padding, and the same work for both prompt sets.
    config = SamplingConfig(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=1,
        seed=args.seed,
    )
    measure(rows[0], backend, tokenizer, config, 1, reset)  # warm-up
    # Short and long runs alternate example by example, so that both see the same machine load.
    per_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        target = row["metadata"]["target_length"]
        per_row[f"short ({target})"].append(
            measure(row, backend, tokenizer, config, args.repeats, reset)
        )
        long_row = {**row, "prompt": row["long_prompt"]}
        per_row[f"long ({target})"].append(
            measure(long_row, backend, tokenizer, config, args.repeats, reset)
        )
    targets = sorted({row["metadata"]["target_length"] for row in rows})
    results = {
        f"{side} ({target})": total(per_row[f"{side} ({target})"])
        for target in targets
        for side in ("short", "long")
    }
    for side in ("short", "long"):
        results[f"{side} (all)"] = total([results[f"{side} ({target})"] for target in targets])
    print(f"\n{name}:")
    header = (
        f"{'prompts':>13} {'examples':>8} {'seconds':>8} {'prompt tok':>10} {'computed':>9} "
        f"{'new tok':>8} {'new tok/s':>9}"
    )
    print(header)
    for label, figures in results.items():
        print(
            f"{label:>13} {figures['examples']:>8} {figures['seconds']:>8.2f} "
            f"{figures['prompt_tokens']:>10} {figures['computed_prompt_tokens']:>9} "
            f"{figures['generated_tokens']:>8} "
            f"{figures['generated_tokens'] / max(figures['seconds'], 1e-9):>9.0f}"
        )
    short, long = results["short (all)"], results["long (all)"]
    print(
        f"long / short: wall time x{long['seconds'] / short['seconds']:.1f}, prompt tokens "
        f"x{long['prompt_tokens'] / short['prompt_tokens']:.1f}, computed prompt tokens "
        f"x{long['computed_prompt_tokens'] / max(1, short['computed_prompt_tokens']):.1f}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", default=str(SAMPLE_PATH), help="MuSiQue or generic QA JSONL")
    parser.add_argument(
        "--target-lengths", default="1k,2k,4k", help="multi-scale long-prompt lengths"
    )
    parser.add_argument(
        "--backends",
        default="transformers",
        help=f"comma-separated, from {', '.join(BACKENDS)} (vllm ones need vLLM installed)",
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
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny Llama width")
    parser.add_argument(
        "--heads",
        type=int,
        default=2,
        help="attention heads (head size = width / heads; vLLM's CPU attention takes 32 and up)",
    )
    parser.add_argument("--layers", type=int, default=2, help="tiny Llama depth")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of transformers (1 is steadiest on a shared machine)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    names = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or not names:
        parser.error(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")

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
        num_heads=args.heads,
        num_kv_heads=max(1, args.heads // 2),
        max_position_embeddings=longest + args.max_new_tokens,
    )
    print(
        f"\nSampling cost, {args.num_samples} samples x up to {args.max_new_tokens} new tokens per "
        f"prompt, tiny Llama ({sum(p.numel() for p in model.parameters())} parameters), one "
        f"prompt per call, fastest of {args.repeats} per example; transformers on "
        f"{torch.get_num_threads()} torch threads. 'computed' = prompt tokens the engine "
        "computed (each sample's copy, less prefix-cache hits)."
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = None
        if any(name.startswith("vllm") for name in names):
            model_dir = Path(scratch) / "tiny-llama"
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        for name in names:
            backend, reset = load(name, model, tokenizer, model_dir)
            results[name] = run_backend(name, rows, backend, reset, tokenizer, args)
            del backend, reset  # frees the engine before the next one starts

    if "transformers" in results:
        base = results["transformers"]
        for name in names:
            if name == "transformers":
                continue
            ratios = ", ".join(
                f"{side} x{base[f'{side} (all)']['seconds'] / results[name][f'{side} (all)']['seconds']:.1f}"
                for side in ("short", "long")
            )
            print(f"{name} speed-up over transformers (wall time): {ratios}")
    if args.json:
        payload = {"lengths": summary, "settings": vars(args), "cost": results}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
