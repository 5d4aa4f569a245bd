"""Accuracy by context length: greedy answers to the short and the long prompts of context files.

What a user runs before and after training to see whether the short-to-long gap closed::

    solopo-data evaluate --input test-4k.jsonl --input test-8k.jsonl --model BEFORE --output before.json
    solopo-data evaluate --input test-4k.jsonl --input test-8k.jsonl --model AFTER \
        --output after.json --baseline before.json

The inputs are ``build-contexts`` files of held-out questions (never the ones the pairs were
sampled from). Every row gives two *items*: its short prompt (shared by the rows of one example
across files, answered once) and its long prompt, labelled with the row's target length. Items
are answered greedily by a generation backend (:mod:`~solopo_kernels.data.backends`), grouped by
label and sorted by prompt length inside a group so that a batch pads little, and judged by the
same judges as ``sample-pairs`` (:mod:`~solopo_kernels.data.judge`).

Answers go to an append-only JSONL, synced after every batch, with a progress file
(:class:`~solopo_kernels.data.store.ResumableOutput`): an interrupted run resumes where it
stopped, keyed by each item's content and the run's settings (model, tokenizer, dtype, judge,
answer length), so a rebuilt input or another model is refused rather than mixed in. Greedy
answers do not depend on the batch, so the batch size is not part of the settings.

The report (:func:`accuracy_table`, :func:`markdown_report`) gives per label the number of
questions, the accuracy and its standard error ``sqrt(p (1 - p) / n)``; with a baseline run on the
same items, the paired comparison per label (:func:`compare_runs`): questions only one run gets
right, and McNemar's exact two-sided p-value.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from .backends import GenerationBackend
from .contexts import Prompt, prompt_text
from .judge import Judge, make_sub_em_judge
from .readers import iter_jsonl
from .store import ResumableOutput, example_key

SHORT = "short"
Prompts = Literal["both", "short", "long"]
#: More distinct target lengths than this (a ``--target-range`` file) are reported in bins.
MAX_EXACT_LENGTHS = 12
LENGTH_BINS = 4


@dataclass(frozen=True)
class EvaluationItem:
    """One prompt to answer: an example's short prompt, or one of its long prompts.

    ``id`` is ``"<example id>@short"`` or ``"<example id>@<length>"``; ``length`` is
    :data:`SHORT` or the long prompt's length label (its target length, or a bin of them);
    ``key`` is the store's content key (:func:`~solopo_kernels.data.store.example_key`).
    """

    id: str
    example_id: str
    length: str
    prompt: Prompt
    answers: tuple[str, ...]
    key: str


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of a run: the longest answer (tokens), prompts per generation call, and which
    prompts of each row are answered (``"both"``, ``"short"`` or ``"long"``)."""

    max_new_tokens: int = 256
    batch_size: int = 8
    prompts: Prompts = "both"

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prompts not in ("both", "short", "long"):
            raise ValueError(f"prompts must be both, short or long, got {self.prompts!r}")


def _target(row: Mapping[str, Any]) -> int | None:
    metadata = row.get("metadata") or {}
    for field in ("target_length", "long_length"):
        if isinstance(metadata.get(field), int):
            return metadata[field]
    return None


def length_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each row's long-prompt label: its ``metadata.target_length`` (else ``long_length``) as a
    string, or ``"long"`` without either. With more than :data:`MAX_EXACT_LENGTHS` distinct
    targets (multi-scale files drawn from a range) the targets are cut into
    :data:`LENGTH_BINS` equal-width bins labelled ``"low-high"``."""
    targets = [_target(row) for row in rows]
    known = sorted({t for t in targets if t is not None})
    if len(known) <= MAX_EXACT_LENGTHS:
        return ["long" if t is None else str(t) for t in targets]
    low, high = known[0], known[-1]
    width = math.ceil((high - low + 1) / LENGTH_BINS)
    labels = []
    for target in targets:
        if target is None:
            labels.append("long")
            continue
        start = low + (target - low) // width * width
        labels.append(f"{start}-{min(high, start + width - 1)}")
    return labels


def evaluation_items(
    files: Sequence[Sequence[Mapping[str, Any]]], prompts: Prompts = "both"
) -> list[EvaluationItem]:
    """The items of one or more context files (each a list of ``build-contexts`` rows).

    An example's short prompt is one item however many files hold the example; files that give
    one example id two different short prompts or answers raise ``ValueError``, as does one
    example at one length label twice with different long prompts. Items come in input order.
    """
    rows = [row for rows in files for row in rows]
    labels = length_labels(rows)
    items: dict[str, EvaluationItem] = {}
    for row, label in zip(rows, labels, strict=True):
        example_id, answers = row["id"], tuple(row["answers"])
        wanted = []
        if prompts in ("both", "short"):
            key = example_key(row["prompt"], None, answers)
            wanted.append((f"{example_id}@{SHORT}", SHORT, row["prompt"], key))
        if prompts in ("both", "long"):
            key = example_key(row["prompt"], row["long_prompt"], answers)
            wanted.append((f"{example_id}@{label}", label, row["long_prompt"], key))
        for item_id, length, prompt, key in wanted:
            if item_id in items:
                if items[item_id].key != key:
                    what = "short prompt or answers" if length == SHORT else "long prompt"
                    raise ValueError(
                        f"example {example_id!r}: two inputs give it different {what} at "
                        f"{length} (rebuilt with other settings?); evaluate them separately"
                    )
                continue
            items[item_id] = EvaluationItem(item_id, example_id, length, prompt, answers, key)
    return list(items.values())


def _label_order(label: str) -> tuple[int, int]:
    if label == SHORT:
        return (0, 0)
    head = label.split("-")[0]
    return (1, int(head)) if head.isdigit() else (2, 0)


@dataclass
class EvaluationRun:
    """What :func:`evaluate` returns: every answer of the items (earlier runs included), in
    item order, and this run's counts: ``answered`` items, ``prompt_tokens``,
    ``generated_tokens``, ``seconds`` of generation."""

    answers: list[dict[str, Any]]
    already_done: int
    answered: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float


def evaluate(
    items: Sequence[EvaluationItem],
    backend: GenerationBackend,
    tokenizer: Any,
    output: str | Path,
    *,
    config: EvaluationConfig = EvaluationConfig(),
    judge: Judge | None = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EvaluationRun:
    """Answer ``items`` greedily with ``backend``, judge the answers, write them resumably.

    Args:
        items: from :func:`evaluation_items`.
        backend: any generation backend; called with ``temperature=0`` (greedy) and one sample.
        tokenizer: the model's tokenizer; conversational prompts are rendered with its chat
            template, string prompts are tokenized with its special tokens.
        output: the answers JSONL (``<output>.progress`` beside it).
        config: answer length, batch size.
        judge: ``judge(response, answers) -> bool``; default sub-EM on the final answer.
        settings: the run's identity (model, tokenizer, dtype, judge, ...), stored with
            ``config.max_new_tokens`` and the backend's name; resuming with other settings
            raises ``ValueError``.
        overwrite: discard an existing output instead of resuming it.
        progress: show a progress bar.

    Answer rows: ``id``, ``key``, ``example_id``, ``length``, ``prompt_tokens``, ``response``,
    ``correct``, ``answers``.
    """
    judge = judge or make_sub_em_judge()
    identity = {
        **(settings or {}),
        "max_new_tokens": config.max_new_tokens,
        "backend": backend.name,
        "decoding": "greedy",
    }

    def recover(row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "key": row["key"], "status": _status(row["correct"])}

    store = ResumableOutput(output, identity, overwrite=overwrite, recover=recover)
    counts: Counter[str] = Counter()
    seconds = 0.0
    try:
        store.check_keys({item.id: item.key for item in items})
        todo = [item for item in items if item.id not in store.records]
        already_done = len(items) - len(todo)
        groups: dict[str, list[tuple[EvaluationItem, list[int]]]] = defaultdict(list)
        for item in todo:
            ids = tokenizer(
                prompt_text(tokenizer, item.prompt), add_special_tokens=isinstance(item.prompt, str)
            )["input_ids"]
            groups[item.length].append((item, ids))
        bar = tqdm(
            total=len(items),
            initial=already_done,
            desc="evaluate",
            unit="answer",
            disable=not progress,
        )
        right: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        for label in sorted(groups, key=_label_order):
            group = sorted(groups[label], key=lambda pair: len(pair[1]))
            for start in range(0, len(group), config.batch_size):
                batch = group[start : start + config.batch_size]
                began = time.perf_counter()
                generation = backend.generate(
                    [ids for _, ids in batch],
                    num_samples=1,
                    max_new_tokens=config.max_new_tokens,
                    temperature=0.0,
                    top_p=1.0,
                    top_k=0,
                    seed=0,
                    prompt_seeds=[0] * len(batch),
                )
                seconds += time.perf_counter() - began
                counts.update(
                    answered=len(batch),
                    prompt_tokens=generation.prompt_tokens,
                    generated_tokens=generation.generated_tokens,
                )
                rows, records = [], []
                for (item, ids), texts in zip(batch, generation.texts, strict=True):
                    response = texts[0].strip()
                    correct = bool(response) and bool(judge(response, list(item.answers)))
                    rows.append(
                        {
                            "id": item.id,
                            "key": item.key,
                            "example_id": item.example_id,
                            "length": item.length,
                            "prompt_tokens": len(ids),
                            "response": response,
                            "correct": correct,
                            "answers": list(item.answers),
                        }
                    )
                    records.append({"id": item.id, "key": item.key, "status": _status(correct)})
                    right[label] += correct
                    seen[label] += 1
                store.append(rows, records)
                bar.update(len(batch))
                bar.set_postfix_str(f"{label}: {right[label] / seen[label]:.0%} of {seen[label]}")
        bar.close()
    finally:
        store.close()
    by_id = {row["id"]: row for _, row in iter_jsonl(store.path)}
    answers = [by_id[item.id] for item in items]
    return EvaluationRun(
        answers=answers,
        already_done=already_done,
        answered=counts["answered"],
        prompt_tokens=counts["prompt_tokens"],
        generated_tokens=counts["generated_tokens"],
        seconds=seconds,
    )


def _status(correct: bool) -> str:
    return "correct" if correct else "incorrect"


def accuracy_table(answers: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per length label (short first, then by length): ``length``, ``questions``, ``correct``,
    ``accuracy`` (fraction), ``stderr`` (its binomial standard error, ``sqrt(p (1 - p) / n)``)
    and ``prompt_tokens`` (mean)."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for answer in answers:
        groups[answer["length"]].append(answer)
    table = []
    for label in sorted(groups, key=_label_order):
        group = groups[label]
        correct = sum(bool(answer["correct"]) for answer in group)
        accuracy = correct / len(group)
        table.append(
            {
                "length": label,
                "questions": len(group),
                "correct": correct,
                "accuracy": accuracy,
                "stderr": math.sqrt(accuracy * (1 - accuracy) / len(group)),
                "prompt_tokens": statistics.fmean(answer["prompt_tokens"] for answer in group),
            }
        )
    return table


def mcnemar_p(only_first: int, only_second: int) -> float:
    """McNemar's exact two-sided p-value for paired binary outcomes: under the null, the
    ``only_first + only_second`` discordant questions split as a fair coin would."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be >= 0, got {only_first} and {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_runs(
    answers: Iterable[Mapping[str, Any]], baseline: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Paired comparison of two runs on the same items, per length label.

    Items are matched by ``id`` and must have the same content ``key`` (else ``ValueError``);
    items of only one run are left out. Per label: ``questions`` (matched), ``accuracy`` and
    ``baseline_accuracy``, ``difference`` (fraction), ``only_this`` and ``only_baseline``
    (questions only one run answers correctly) and ``p_value`` (McNemar, exact).
    """
    before = {answer["id"]: answer for answer in baseline}
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for answer in answers:
        other = before.get(answer["id"])
        if other is None:
            continue
        if other["key"] != answer["key"]:
            raise ValueError(
                f"baseline: item {answer['id']!r} has other content than in this run (another "
                "build of the contexts?); compare runs on the same files"
            )
        groups[answer["length"]].append((bool(answer["correct"]), bool(other["correct"])))
    rows = []
    for label in sorted(groups, key=_label_order):
        pairs = groups[label]
        only_this = sum(a and not b for a, b in pairs)
        only_baseline = sum(b and not a for a, b in pairs)
        accuracy = sum(a for a, _ in pairs) / len(pairs)
        baseline_accuracy = sum(b for _, b in pairs) / len(pairs)
        rows.append(
            {
                "length": label,
                "questions": len(pairs),
                "accuracy": accuracy,
                "baseline_accuracy": baseline_accuracy,
                "difference": accuracy - baseline_accuracy,
                "only_this": only_this,
                "only_baseline": only_baseline,
                "p_value": mcnemar_p(only_this, only_baseline),
            }
        )
    return rows


def markdown_report(report: Mapping[str, Any]) -> str:
    """The accuracy table of a report (see :func:`build_report`), and the paired comparison
    with the baseline when there is one, as markdown."""
    settings = report["settings"]
    lines = [
        f"Accuracy of `{settings.get('model')}` (greedy, judge {settings.get('judge')}, "
        f"answers up to {settings['max_new_tokens']} tokens, backend {settings['backend']}):",
        "",
        "| context | questions | accuracy (%) | ± s.e. | mean prompt tokens |",
        "|---|---|---|---|---|",
    ]
    for row in report["accuracy"]:
        lines.append(
            f"| {row['length']} | {row['questions']} | {100 * row['accuracy']:.1f} | "
            f"{100 * row['stderr']:.1f} | {row['prompt_tokens']:.0f} |"
        )
    if report.get("comparison"):
        lines += [
            "",
            f"Against the baseline `{report['baseline']}` (the same questions, paired):",
            "",
            "| context | questions | this run (%) | baseline (%) | difference (points) | "
            "only this run right | only baseline right | McNemar p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in report["comparison"]:
            lines.append(
                f"| {row['length']} | {row['questions']} | {100 * row['accuracy']:.1f} | "
                f"{100 * row['baseline_accuracy']:.1f} | {100 * row['difference']:+.1f} | "
                f"{row['only_this']} | {row['only_baseline']} | {row['p_value']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def build_report(
    run: EvaluationRun,
    settings: Mapping[str, Any],
    *,
    inputs: Sequence[str] = (),
    baseline: Mapping[str, Any] | None = None,
    baseline_path: str | None = None,
) -> dict[str, Any]:
    """The JSON report of a run: ``settings``, ``inputs``, ``accuracy`` (:func:`accuracy_table`),
    ``comparison`` with ``baseline`` (another report) when given, ``run`` (this run's counts and
    seconds) and ``answers`` (every answer)."""
    report: dict[str, Any] = {
        "settings": dict(settings),
        "inputs": list(inputs),
        "accuracy": accuracy_table(run.answers),
        "run": {
            "answered": run.answered,
            "already_done": run.already_done,
            "prompt_tokens": run.prompt_tokens,
            "generated_tokens": run.generated_tokens,
            "seconds": run.seconds,
        },
    }
    if baseline is not None:
        report["baseline"] = baseline_path
        report["comparison"] = compare_runs(run.answers, baseline["answers"])
    report["answers"] = run.answers
    return report
