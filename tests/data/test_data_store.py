"""The resumable store: resuming is keyed by each example's content and the run's settings, not
by the input's path (a rebuilt contexts file under the same ids is refused, a moved one
resumes), through the command line as users run it, and the store on its own."""

from __future__ import annotations

import json
import shutil

import pytest

from solopo_kernels.data.cli import main
from solopo_kernels.data.store import ResumableOutput, example_key

from .conftest import read_jsonl


def _build(sample_path, output, *extra: str) -> list[str]:
    command = ["build-contexts", "--input", str(sample_path), "--output", str(output)]
    return [*command, "--tokenizer", "tiny", "--limit", "6", "--quiet", *extra]


def _sample(contexts, pairs, *extra: str) -> list[str]:
    command = ["sample-pairs", "--input", str(contexts), "--output", str(pairs), "--model", "tiny"]
    command += ["--tokenizer", "tiny", "--num-samples", "2", "--max-new-tokens", "3"]
    command += ["--batch-size", "2", "--include-gold", "--keep-truncated", "--quiet"]
    return [*command, *extra]


@pytest.mark.parametrize(
    "rebuild",
    [["--target-lengths", "512", "--seed", "1"], ["--target-lengths", "1k", "--seed", "0"]],
    ids=["new-seed", "new-lengths"],
)
def test_a_rebuilt_contexts_file_is_not_mixed_into_the_pairs(
    tmp_path, sample_path, capsys, rebuild
):
    contexts, pairs = tmp_path / "contexts.jsonl", tmp_path / "pairs.jsonl"
    assert main(_build(sample_path, contexts, "--target-lengths", "512", "--seed", "0")) == 0
    assert main(_sample(contexts, pairs, "--limit", "4")) == 0  # 4 of 6 done, then stopped
    first_build = {row["id"]: row["long_prompt"] for row in read_jsonl(contexts)}
    # The same command, the same path and ids, other contents.
    assert main(_build(sample_path, contexts, *rebuild)) == 0
    assert {row["id"] for row in read_jsonl(contexts)} == set(first_build)
    assert all(row["long_prompt"] != first_build[row["id"]] for row in read_jsonl(contexts))
    capsys.readouterr()
    assert main(_sample(contexts, pairs)) == 2
    error = capsys.readouterr().err
    assert "4 examples of the input differ from the ones" in error and "--overwrite" in error
    assert len(read_jsonl(pairs)) == 4  # nothing appended from the new build
    # --overwrite starts afresh on the new build: every pair comes from it.
    assert main(_sample(contexts, pairs, "--overwrite")) == 0
    rebuilt = {row["id"]: row["long_prompt"] for row in read_jsonl(contexts)}
    assert [row["long_prompt"] for row in read_jsonl(pairs)] == list(rebuilt.values())


def test_a_moved_contexts_file_resumes(tmp_path, sample_path, capsys):
    contexts, pairs = tmp_path / "contexts.jsonl", tmp_path / "pairs.jsonl"
    assert main(_build(sample_path, contexts, "--target-lengths", "512")) == 0
    assert main(_sample(contexts, pairs, "--limit", "4")) == 0
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(contexts, moved)
    capsys.readouterr()
    assert main(_sample(moved, pairs)) == 0
    assert "(4 of 6 were already done)" in capsys.readouterr().out
    assert [row["id"] for row in read_jsonl(pairs)] == [row["id"] for row in read_jsonl(moved)]


def test_a_progress_file_of_the_path_keyed_format_is_refused(tmp_path):
    output = tmp_path / "pairs.jsonl"
    output.write_text("")
    old_header = {"settings": {"num_samples": 2, "input": "/data/contexts.jsonl"}}
    (tmp_path / "pairs.jsonl.progress").write_text(json.dumps(old_header) + "\n")
    with pytest.raises(ValueError, match="keyed by the input's path"):
        ResumableOutput(output, {"num_samples": 2})


def test_the_store_checks_keys_and_recovers_unrecorded_rows(tmp_path):
    output = tmp_path / "out.jsonl"
    key = example_key("short?", [{"role": "user", "content": "long?"}], ["A"])
    assert key != example_key("short?", [{"role": "user", "content": "long!"}], ["A"])
    assert key == example_key("short?", [{"content": "long?", "role": "user"}], ("A",))
    with ResumableOutput(output, {"seed": 0}) as store:
        store.append([{"id": "a", "value": 1}], [{"id": "a", "key": key, "status": "done"}])
    # A row written without its record (stopped between the two writes).
    with open(output, "a") as handle:
        handle.write(json.dumps({"id": "b", "value": 2}) + "\n")
    with pytest.raises(ValueError, match="1 rows have no record"):
        ResumableOutput(output, {"seed": 0})

    def recover(row):
        return {"id": row["id"], "key": "k-b", "status": "done"}

    with ResumableOutput(output, {"seed": 0}, recover=recover) as store:
        assert store.statuses == {"a": "done", "b": "done"}
        store.check_keys({"a": key, "b": "k-b", "c": "new"})  # unchanged or new: fine
        with pytest.raises(ValueError, match=r"1 examples of the input differ .*\('b'\)"):
            store.check_keys({"a": key, "b": "changed"})
