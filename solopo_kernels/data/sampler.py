"""Sample responses on the short prompts, judge them, and write preference pairs, resumably.

For each context row (the output of :func:`~solopo_kernels.data.contexts.build_contexts`) the
sampler generates ``num_samples`` responses to the *short* prompt with a generation backend
(:mod:`solopo_kernels.data.backends`), judges each one against the gold answers, and writes
``chosen`` = the first correct response and ``rejected`` = the first incorrect one (empty
responses are neither). Rows without both are skipped and counted.

The output is a :class:`~solopo_kernels.data.store.ResumableOutput`: append-only JSONL, synced
after every batch, next to a ``.progress`` file that records every finished example (pairs and
skips) with its content key, and the run's settings. Rerunning with the same settings skips
finished examples; an input rebuilt under the same ids is refused rather than mixed. Batches
are fixed slices of the input with a seed per slice, so a resumed run writes the same rows as an
uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .backends import GenerationBackend, prompt_seed
from .contexts import prompt_text
from .judge import Judge, make_sub_em_judge
from .store import ResumableOutput, example_key


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled and pairs picked.

    ``num_samples`` responses per short prompt at ``temperature`` (with ``top_p`` and ``top_k``;
    ``top_k=0`` means no top-k cut), at most ``max_new_tokens`` each; ``batch_size`` prompts per
    backend call; ``seed`` seeds each batch. ``include_gold`` adds the reference response
    ``"The answer is <gold answer>."`` after the samples, so an example always has a correct
    candidate (for demos with models that cannot answer; the pair is then off-policy).
    A sample cut by ``max_new_tokens`` (no end-of-sequence token: an unfinished answer) is
    neither chosen nor rejected unless ``keep_truncated`` (for models that never stop, such as
    the random ``tiny`` demo model); backends that cannot tell count every sample as finished.
    """

    num_samples: int = 32
    temperature: float = 0.85
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    include_gold: bool = False
    keep_truncated: bool = False

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class SamplingSummary:
    """Counts and costs of a run.

    ``pairs``, ``no_correct`` and ``no_incorrect`` count the whole output (earlier runs
    included); the other fields count this run: ``processed`` examples, ``samples`` generated,
    ``prompt_tokens`` (each prompt once), ``generated_tokens``, ``seconds`` of generation and
    ``truncated`` samples (cut by ``max_new_tokens``; left out unless ``keep_truncated``).
    ``cached_prompt_tokens``: prompt tokens (over every sample's copy of its prompt) that the
    engine took from its prefix cache, where the backend reports it (vLLM, transformers: 0),
    else ``None``. The engine computed ``prompt_tokens * num_samples - cached_prompt_tokens``.
    """

    examples: int
    already_done: int
    processed: int
    pairs: int
    no_correct: int
    no_incorrect: int
    samples: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    cached_prompt_tokens: int | None = None
    truncated: int = 0
    truncated_kept: bool = False

    def __str__(self) -> str:
        return (
            f"{self.pairs} pairs written in total; skipped {self.no_correct} examples without a "
            f"correct response and {self.no_incorrect} without an incorrect one. This run: "
            f"{self.processed} examples ({self.already_done} of {self.examples} were already "
            f"done), {self.samples} samples, {self.prompt_tokens} prompt tokens, "
            f"{self.generated_tokens} generated tokens, {self.seconds:.1f} s generating."
            + (
                f" {self.truncated} samples were cut by max_new_tokens"
                + (
                    " (judged: keep_truncated)."
                    if self.truncated_kept
                    else " and left out (raise --max-new-tokens, or pass --keep-truncated)."
                )
                if self.truncated
                else ""
            )
        )


def gold_response(answers: Sequence[str]) -> str:
    """The reference response that ``include_gold`` adds: ``"The answer is <answers[0]>."``.

    After a string prompt the sampler puts a space before it, like a sampled continuation.
    """
    return f"The answer is {answers[0]}."


def _row_key(row: dict[str, Any], answers: Sequence[str]) -> str:
    return example_key(row["prompt"], row["long_prompt"], answers)


def _recover_record(pair_row: dict[str, Any]) -> dict[str, Any]:
    """The progress record of a pair row written without it (a stop between the two writes)."""
    metadata = pair_row["metadata"]
    return {
        "id": pair_row["id"],
        "key": _row_key(pair_row, metadata["answers"]),
        "status": "pair",
        "num_correct": metadata["num_correct"],
        "num_truncated": metadata["num_truncated"],
    }


def _batch_seed(seed: int, batch_index: int) -> int:
    return random.Random(f"{seed}/{batch_index}").getrandbits(31)


def _as_response(text: str, conversational: bool) -> str | list[dict[str, str]]:
    return [{"role": "assistant", "content": text}] if conversational else text


def sample_pairs(
    rows: Sequence[dict[str, Any]],
    backend: GenerationBackend,
    tokenizer: Any,
    output: str | Path,
    *,
    config: SamplingConfig = SamplingConfig(),
    judge: Judge | None = None,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SamplingSummary:
    """Sample, judge and write preference pairs for ``rows``; return the run's summary.

    Args:
        rows: context rows (see :func:`~solopo_kernels.data.readers.read_context_rows`), in a
            fixed order: batches are the slices ``rows[i * batch_size : (i + 1) * batch_size]``.
        backend: the generation backend.
        tokenizer: the model's tokenizer; conversational prompts are rendered with its chat
            template, string prompts are tokenized with its special tokens.
        output: the output JSONL (``<output>.progress`` is written next to it).
        config: sampling settings.
        judge: ``judge(response, answers) -> bool``; default sub-EM on the final answer
            (:func:`~solopo_kernels.data.judge.make_sub_em_judge`).
        settings: extra identity of the run (model, judge, ...), stored with ``config``; resuming
            with different settings raises ``ValueError``, and so does resuming on rows whose
            content changed under the same ids (a rebuilt contexts file).
        overwrite: discard an existing output instead of resuming it.
        progress: show a progress bar.

    Output rows: ``id``, ``prompt``, ``long_prompt``, ``chosen``, ``rejected`` (strings, or
    ``[{"role": "assistant", "content": ...}]`` for conversational prompts) and ``metadata``
    (the context's metadata plus ``answers``, ``num_samples``, ``num_correct`` (correct samples
    among those judged), ``num_truncated`` (samples cut by ``max_new_tokens``),
    ``chosen_source``: ``"sample"`` or ``"gold"``).
    """
    judge = judge or make_sub_em_judge()
    keys = {row["id"]: _row_key(row, row["answers"]) for row in rows}
    store = ResumableOutput(
        output,
        {**asdict(config), **(settings or {}), "backend": backend.name},
        overwrite=overwrite,
        recover=_recover_record,
    )
    try:
        store.check_keys(keys)
    except BaseException:
        store.close()
        raise
    already_done = sum(row["id"] in store.records for row in rows)
    counts = Counter(samples=0, prompt_tokens=0, generated_tokens=0, truncated=0)
    cached: int | None = 0
    seconds = 0.0
    bar = tqdm(
        total=len(rows),
        initial=already_done,
        desc="sample-pairs",
        unit="example",
        disable=not progress,
    )
    try:
        for batch_index, start in enumerate(range(0, len(rows), config.batch_size)):
            batch = rows[start : start + config.batch_size]
            if all(row["id"] in store.records for row in batch):
                continue
            prompt_ids = [
                tokenizer(
                    prompt_text(tokenizer, row["prompt"]),
                    add_special_tokens=isinstance(row["prompt"], str),
                )["input_ids"]
                for row in batch
            ]
            began = time.perf_counter()
            generation = backend.generate(
                prompt_ids,
                num_samples=config.num_samples,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                seed=_batch_seed(config.seed, batch_index),
                prompt_seeds=[prompt_seed(config.seed, row["id"]) for row in batch],
            )
            seconds += time.perf_counter() - began
            counts.update(
                samples=config.num_samples * len(batch),
                prompt_tokens=generation.prompt_tokens,
                generated_tokens=generation.generated_tokens,
            )
            if cached is not None and generation.cached_prompt_tokens is not None:
                cached += generation.cached_prompt_tokens
            else:
                cached = None
            out_rows, records = [], []
            cut = generation.truncated or [[False] * len(texts) for texts in generation.texts]
            for row, texts, flags in zip(batch, generation.texts, cut, strict=True):
                if row["id"] in store.records:
                    continue
                counts.update(truncated=sum(flags))
                pair_row, record = _judge_row(row, texts, flags, judge, config)
                records.append({"id": row["id"], "key": keys[row["id"]], **record})
                if pair_row is not None:
                    out_rows.append(pair_row)
            store.append(out_rows, records)
            bar.update(len(records))
    finally:
        bar.close()
        store.close()
    totals = Counter(store.statuses.values())
    return SamplingSummary(
        examples=len(rows),
        already_done=already_done,
        processed=sum(row["id"] in store.statuses for row in rows) - already_done,
        pairs=totals["pair"],
        no_correct=totals["no_correct"],
        no_incorrect=totals["no_incorrect"],
        samples=counts["samples"],
        prompt_tokens=counts["prompt_tokens"],
        generated_tokens=counts["generated_tokens"],
        seconds=seconds,
        cached_prompt_tokens=cached,
        truncated=counts["truncated"],
        truncated_kept=config.keep_truncated,
    )


def _judge_row(
    row: dict[str, Any],
    texts: Sequence[str],
    truncated: Sequence[bool],
    judge: Judge,
    config: SamplingConfig,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Judge one example's samples; return its output row (None when skipped) and its record.

    ``truncated[j]``: sample ``j`` was cut by ``max_new_tokens`` (left out unless
    ``config.keep_truncated``).
    """
    answers = row["answers"]
    conversational = isinstance(row["prompt"], list)
    # A string prompt is continued by the response as generated (its leading space included);
    # a chat response is a message of its own.
    candidates = [
        (text.strip() if conversational else text.rstrip(), "sample")
        for text, cut in zip(texts, truncated, strict=True)
        if config.keep_truncated or not cut
    ]
    if config.include_gold:
        gold = gold_response(answers)
        candidates.append((gold if conversational else f" {gold}", "gold"))
    verdicts = [(text, source, judge(text, answers)) for text, source in candidates if text.strip()]
    correct = [(text, source) for text, source, ok in verdicts if ok]
    incorrect = [text for text, _, ok in verdicts if not ok]
    num_correct = sum(ok for _, source, ok in verdicts if source == "sample")
    status = "no_correct" if not correct else "no_incorrect" if not incorrect else "pair"
    record = {
        "id": row["id"],
        "status": status,
        "num_correct": num_correct,
        "num_truncated": sum(truncated),
    }
    if status != "pair":
        return None, record
    chosen, source = correct[0]
    pair_row = {
        "id": row["id"],
        "prompt": row["prompt"],
        "long_prompt": row["long_prompt"],
        "chosen": _as_response(chosen, conversational),
        "rejected": _as_response(incorrect[0], conversational),
        "metadata": {
            **row.get("metadata", {}),
            "answers": answers,
            "num_samples": config.num_samples,
            "num_correct": num_correct,
            "num_truncated": sum(truncated),
            "chosen_source": source,
        },
    }
    return pair_row, record
