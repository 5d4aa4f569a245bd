"""Readers that turn QA files into :class:`QAExample` records.

Two JSONL schemas are understood, one JSON object per line:

* **MuSiQue** (``musique``): ``id``, ``question``, ``answer``, optional ``answer_aliases``,
  optional ``answerable`` (rows with ``false`` are skipped: they have no gold answer to judge
  against), and ``paragraphs``: a list of ``{"title", "paragraph_text", "is_supporting"}``.
  Supporting paragraphs become the example's relevant passages, the others its own distractors.
* **generic** (``generic``): ``question``, ``answers`` (a string or a list: the answer and its
  aliases), ``passages`` (the relevant passages), optional ``distractors``, optional ``id``
  (default: ``line-N``). A passage is a string or ``{"title", "text"}``.

Context rows (the output of ``build-contexts``, the input of ``sample-pairs``) are read and
checked by :func:`read_context_rows`.

Every problem raises a ``ValueError`` that names the file, the line, the example id and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

InputFormat = Literal["auto", "musique", "generic"]


@dataclass(frozen=True)
class Passage:
    """A paragraph of evidence or of filler: an optional ``title`` and its ``text``."""

    title: str
    text: str

    def render(self) -> str:
        """Return the passage as it appears in a prompt: the title on its own line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answers, relevant passages and own distractors."""

    id: str
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]
    distractors: tuple[Passage, ...] = ()


def _fail(where: str, field: str, problem: str) -> ValueError:
    return ValueError(f"{where}: field {field!r} {problem}")


def _text(row: dict[str, Any], key: str, where: str, *, field: str | None = None) -> str:
    """Return ``row[key]`` as a non-empty stripped string, or raise naming ``field``."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        state = "is missing" if value is None else "must be a non-empty string"
        raise _fail(where, field or key, state)
    return value.strip()


def _string_list(value: Any, where: str, field: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _fail(where, field, "must be a string or a list of strings")
    return tuple(item.strip() for item in items if item.strip())


def parse_musique(row: dict[str, Any], where: str) -> QAExample | None:
    """Parse one MuSiQue row; return None for an unanswerable one (``answerable: false``).

    ``where`` locates the row in error messages (``"file.jsonl:3"``).
    """
    example_id = _text(row, "id", where)
    where = f"{where}: example {example_id!r}"
    if row.get("answerable", True) is False:
        return None
    question = _text(row, "question", where)
    answers = (
        _text(row, "answer", where),
        *_string_list(row.get("answer_aliases", []), where, "answer_aliases"),
    )
    paragraphs = row.get("paragraphs")
    if not isinstance(paragraphs, list) or not paragraphs:
        raise _fail(where, "paragraphs", "must be a non-empty list")
    relevant: list[Passage] = []
    distractors: list[Passage] = []
    for index, paragraph in enumerate(paragraphs):
        field = f"paragraphs[{index}]"
        if not isinstance(paragraph, dict):
            raise _fail(where, field, "must be an object")
        passage = Passage(
            title=str(paragraph.get("title") or "").strip(),
            text=_text(paragraph, "paragraph_text", where, field=f"{field}.paragraph_text"),
        )
        (relevant if paragraph.get("is_supporting") is True else distractors).append(passage)
    if not relevant:
        raise _fail(where, "paragraphs", "has no paragraph with is_supporting: true")
    return QAExample(example_id, question, answers, tuple(relevant), tuple(distractors))


def _passages(value: Any, where: str, field: str) -> tuple[Passage, ...]:
    if not isinstance(value, list):
        raise _fail(where, field, "must be a list of strings or {title, text} objects")
    passages = []
    for index, item in enumerate(value):
        item_field = f"{field}[{index}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise _fail(where, item_field, "must be a string or a {title, text} object")
        title = str(item.get("title") or "").strip()
        passages.append(Passage(title, _text(item, "text", where, field=f"{item_field}.text")))
    return tuple(passages)


def parse_generic(row: dict[str, Any], where: str, line_number: int) -> QAExample:
    """Parse one generic-schema row; the id defaults to ``line-<line_number>``."""
    example_id = str(row.get("id") or f"line-{line_number}")
    where = f"{where}: example {example_id!r}"
    question = _text(row, "question", where)
    if "answers" not in row:
        raise _fail(where, "answers", "is missing")
    answers = _string_list(row["answers"], where, "answers")
    if not answers:
        raise _fail(where, "answers", "has no non-empty answer")
    passages = _passages(row.get("passages"), where, "passages")
    if not passages:
        raise _fail(where, "passages", "has no relevant passage")
    distractors = _passages(row.get("distractors", []), where, "distractors")
    return QAExample(example_id, question, answers, passages, distractors)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based lines)."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
            yield line_number, row


def read_examples(path: str | Path, input_format: InputFormat = "auto") -> list[QAExample]:
    """Read a MuSiQue or generic JSONL file and return its examples in file order.

    ``input_format="auto"`` picks ``musique`` for rows with a ``paragraphs`` field and
    ``generic`` otherwise, row by row. Duplicate ids raise a ``ValueError`` (ids key the
    resumable sampler's output).
    """
    if input_format not in ("auto", "musique", "generic"):
        raise ValueError(f"input_format must be auto, musique or generic, got {input_format!r}")
    examples: list[QAExample] = []
    seen: dict[str, int] = {}
    skipped = 0
    for line_number, row in iter_jsonl(path):
        where = f"{path}:{line_number}"
        musique = input_format == "musique" or (input_format == "auto" and "paragraphs" in row)
        example = parse_musique(row, where) if musique else parse_generic(row, where, line_number)
        if example is None:
            skipped += 1
            continue
        if example.id in seen:
            raise ValueError(
                f"{where}: example {example.id!r}: field 'id' repeats line {seen[example.id]}"
            )
        seen[example.id] = line_number
        examples.append(example)
    if skipped:
        logger.warning("%s: skipped %d unanswerable example(s)", path, skipped)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def read_context_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a context file (``build-contexts`` output); return its rows in order.

    Each row needs a unique string ``id``, ``prompt`` and ``long_prompt`` (both strings or both
    message lists), and ``answers`` (a non-empty list of strings).
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_number, row in iter_jsonl(path):
        example_id = row.get("id")
        where = f"{path}:{line_number}: example {example_id!r}"
        if not isinstance(example_id, str) or not example_id:
            raise ValueError(f"{path}:{line_number}: field 'id' must be a non-empty string")
        if example_id in seen:
            raise ValueError(f"{where}: field 'id' is repeated")
        seen.add(example_id)
        for field in ("prompt", "long_prompt"):
            if not isinstance(row.get(field), str | list) or not row[field]:
                raise ValueError(f"{where}: field {field!r} must be a string or a message list")
        if type(row["prompt"]) is not type(row["long_prompt"]):
            raise ValueError(f"{where}: fields 'prompt' and 'long_prompt' differ in format")
        answers = row.get("answers")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(answer, str) and answer.strip() for answer in answers)
        ):
            raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
