"""The resumable output of a run over examples: an append-only JSONL and its progress file.

A long run (sampling pairs, evaluating a model) writes one batch of result rows at a time and
may be stopped at any point. :class:`ResumableOutput` keeps two files, each flushed and synced
after every batch:

* ``OUTPUT``: the result rows (JSONL, append-only);
* ``OUTPUT.progress``: a header with the run's settings, then one record per finished example:
  its ``id``, its content key (:func:`example_key`) and its ``status``, plus whatever the caller
  adds.

Rerunning with the same settings resumes: finished examples are skipped. Resuming is keyed by
the *content* of each example and by the settings, never by the input's path: an input moved or
renamed resumes, while an input rebuilt under the same ids (new lengths, a new seed, another
tokenizer) is refused, because its results would be mixed with the earlier build's
(:meth:`ResumableOutput.check_keys`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Version of the progress file's layout. 2: records carry the example's content key and the
#: header has no input path (1 kept the input's path in the settings and no keys).
PROGRESS_FORMAT = 2


def example_key(prompt: Any, long_prompt: Any, answers: Sequence[str]) -> str:
    """The content key of a context example: 16 hex digits of the SHA-256 of its short prompt,
    long prompt and answers (strings or message lists, as JSON).

    Two builds of one example (same id) with other lengths, distractors or seeds have different
    long prompts, so different keys. The key reads only these three fields, so it can be
    recomputed from a result row that carries them.
    """
    text = json.dumps([prompt, long_prompt, list(answers)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def drop_partial_line(path: Path, chunk_size: int = 1 << 16) -> None:
    """Cut a last line that a crash left without its newline (reading only the file's tail)."""
    with open(path, "r+b") as handle:
        end = position = handle.seek(0, os.SEEK_END)
        while position > 0:
            step = min(chunk_size, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            if position == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position - step + newline + 1)
                return
            position -= step
        handle.truncate(0)


class ResumableOutput:
    """The append-only output JSONL and its ``.progress`` record file.

    Args:
        path: the output JSONL; the progress file is ``<path>.progress``.
        settings: the run's identity (JSON-serialisable); resuming with other settings raises
            ``ValueError`` naming the keys that differ.
        overwrite: discard existing files instead of resuming them.
        recover: turns a result row that was written without its record (the run stopped
            between the two writes) into that record; ``None``: every row has a record.

    Opening existing files checks the settings, cuts a half-written last line in each, and
    restores the records of rows written but not recorded. ``records`` maps each finished
    example's id to its record (``id``, ``key``, ``status``, ...).
    """

    def __init__(
        self,
        path: str | Path,
        settings: Mapping[str, Any],
        *,
        overwrite: bool = False,
        recover: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.progress_path = self.path.with_name(self.path.name + ".progress")
        settings = json.loads(json.dumps(dict(settings)))
        header = {"settings": settings, "format": PROGRESS_FORMAT}
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.progress_path.unlink(missing_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        if self.progress_path.exists():
            self._resume(header, recover)
        elif self.path.exists() and self.path.stat().st_size:
            raise ValueError(
                f"{self.path} exists but {self.progress_path.name} does not; pass overwrite "
                "(--overwrite) or choose another output path"
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            self.progress_path.write_text(json.dumps(header) + "\n")
        self._rows = open(self.path, "a", encoding="utf-8")
        self._progress = open(self.progress_path, "a", encoding="utf-8")

    @property
    def statuses(self) -> dict[str, str]:
        """Each finished example's status, by id."""
        return {example_id: record["status"] for example_id, record in self.records.items()}

    def _resume(
        self,
        header: dict[str, Any],
        recover: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> None:
        drop_partial_line(self.path)
        drop_partial_line(self.progress_path)
        lines = self.progress_path.read_text(encoding="utf-8").splitlines()
        if not lines:  # stopped right after creating the files
            self.progress_path.write_text(json.dumps(header) + "\n")
            return
        stored = json.loads(lines[0])
        if stored.get("format") != PROGRESS_FORMAT:
            raise ValueError(
                f"{self.path} was written by an older version of this tool, whose resume was "
                "keyed by the input's path and cannot tell whether the input changed; pass "
                "--overwrite or choose another output path"
            )
        stored_settings, settings = stored["settings"], header["settings"]
        if stored_settings != settings:
            changed = sorted(
                key
                for key in settings.keys() | stored_settings.keys()
                if stored_settings.get(key) != settings.get(key)
            )
            raise ValueError(
                f"{self.path} was written with different settings ({', '.join(changed)}); rerun "
                "with the same options, pass --overwrite, or choose another output path"
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.records[record["id"]] = record
        from .readers import iter_jsonl

        missing = [row for _, row in iter_jsonl(self.path) if row["id"] not in self.records]
        if missing:
            if recover is None:
                raise ValueError(
                    f"{self.path}: {len(missing)} rows have no record in "
                    f"{self.progress_path.name}; pass --overwrite to start afresh"
                )
            restored = [recover(row) for row in missing]
            with open(self.progress_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in restored)
            self.records.update((record["id"], record) for record in restored)

    def check_keys(self, keys: Mapping[str, str]) -> None:
        """Raise ``ValueError`` if an example finished earlier has another content key now.

        ``keys`` maps the input's ids to their :func:`example_key`. Ids that are not finished
        (or not in the input) are fine; a finished id whose content changed means the input
        was rebuilt under the same ids, and resuming would mix results of two inputs.
        """
        changed = [
            example_id
            for example_id, key in keys.items()
            if example_id in self.records and self.records[example_id].get("key") != key
        ]
        if changed:
            shown = ", ".join(map(repr, changed[:5])) + (
                f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            )
            raise ValueError(
                f"{len(changed)} examples of the input differ from the ones {self.path} was "
                f"written from ({shown}): the input was rebuilt under the same ids (other "
                "lengths, seed or tokenizer?), and resuming would mix the results of both. "
                "Pass --overwrite, or choose another output path"
            )

    def append(self, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> None:
        """Write a batch's rows, then its records (each with ``id``, ``key``, ``status``); each
        file is flushed and synced."""
        for handle, items in ((self._rows, rows), (self._progress, records)):
            handle.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
            handle.flush()
            os.fsync(handle.fileno())
        self.records.update((record["id"], dict(record)) for record in records)

    def close(self) -> None:
        """Close both files."""
        self._rows.close()
        self._progress.close()

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
