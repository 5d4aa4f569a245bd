"""The replication script's plumbing (``--quick``): every file is written, a rerun skips finished
units, the table and plot are produced, the numbers are finite and in range. Not the outcome:
the quick preset's model cannot answer (it is offered the gold answer to get pairs at all)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "replicate_solopo.py"
# examples/ goes on the path only for this import: left there, its folders (examples/axolotl)
# would shadow installed packages of the same name for every later test.
sys.path.insert(0, str(EXAMPLES))
try:
    from replication.config import QUICK
    from replication.grid import grid_units, sweep_units
    from replication.pipeline import Workspace, read_jsonl, short_chat_prompt
    from replication.qa_world import Lexicon, make_split
finally:
    sys.path.remove(str(EXAMPLES))


def _run(work: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--quick", "--work-dir", str(work)]
    command += ["--results", str(results)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_questions_are_consistent_and_answerable():
    lexicon = Lexicon.build()
    rows = make_split(lexicon, "test", 200, 0)
    titles = [p["title"] for row in rows for p in (*row["passages"], *row["distractors"])]
    assert len(titles) == len(set(titles))  # one biography per person in a split
    for row in rows:
        [answer] = row["answers"]
        relevant = " ".join(p["text"] for p in row["passages"])
        assert f" {answer} ." in relevant
        assert row["reference"].endswith(f"The answer is {answer} .")
        assert len(row["passages"]) == row["metadata"]["hops"]
        for sentence in row["reference"].split(" . ")[:-1]:  # the chain is copied evidence
            assert sentence + " ." in relevant
    assert {row["metadata"]["hops"] for row in rows} == {1, 2}


@pytest.mark.slow
def test_quick_run_writes_results_and_resumes(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    first = _run(work, results)
    assert first.returncode == 0, first.stderr[-3000:]

    # The fine-tuning prompts are exactly the short prompts that build-contexts writes.
    questions = {row["id"]: row for row in read_jsonl(work / "questions" / "train.jsonl")}
    for row in read_jsonl(Workspace(work, results).contexts("train")):
        assert short_chat_prompt(questions[row["id"]]) == row["prompt"]

    selection = json.loads((results / "selection.json").read_text())
    chosen = {arm: choice["hparams"] for arm, choice in selection.items()}
    units = {"dev": sweep_units(QUICK), "test": grid_units(QUICK, chosen)}
    for split, expected in units.items():
        files = sorted((results / "units" / split).glob("*.json"))
        assert len(files) == len(expected), split
        for path in files:
            result = json.loads(path.read_text())
            assert set(result["accuracy"]) == {"short", *map(str, QUICK.eval_lengths)}
            assert all(0.0 <= value <= 1.0 for value in result["accuracy"].values())
            assert all(
                len(v) == QUICK.__dict__[f"{split}_questions"] for v in result["correct"].values()
            )
            if result["unit"]["variant"] != "base":
                cost = result["cost"]
                assert cost["steps"] == QUICK.steps
                assert (
                    math.isfinite(cost["step_seconds_median"]) and cost["step_seconds_median"] > 0
                )
                assert all(math.isfinite(entry["loss"]) for entry in cost["log"])

    report = json.loads((results / "replication.json").read_text())
    assert len(report["summary"]["arms"]) == 10  # the starting model and 9 arms
    for arm in report["summary"]["arms"].values():
        for stats in (*arm["accuracy"].values(), arm["long_avg"]):
            assert 0.0 <= stats["mean"] <= 100.0 and math.isfinite(stats["std"])
    assert report["pairs"]["pairs"] > 0
    table = (results / "replication.md").read_text()
    assert "| **SoLo-SimPO** |" in table and "expand-long" in table and "(chosen)" in table
    assert (results / "replication.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerun after losing one result: only that unit runs again, nothing else is redone.
    lost = results / "units" / "test" / f"{units['test'][-1].model_key}.json"
    lost.unlink()
    kept = {
        path: path.stat().st_mtime_ns
        for path in [*results.glob("units/*/*.json"), work / "starting-model" / "sft_record.json"]
    }
    second = _run(work, results)
    assert second.returncode == 0, second.stderr[-3000:]
    assert lost.exists()
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())
