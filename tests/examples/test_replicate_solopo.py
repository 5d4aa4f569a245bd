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
import torch

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "replicate_solopo.py"
# examples/ goes on the path only for this import: left there, its folders (examples/axolotl)
# would shadow installed packages of the same name for every later test.
sys.path.insert(0, str(EXAMPLES))
try:
    from replication import pipeline
    from replication.config import FULL, QUICK, SFTConfig
    from replication.grid import alpha_units, grid_units, sweep_units
    from replication.pipeline import Workspace, _sft_batch, read_jsonl, short_chat_prompt
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


def test_fine_tuning_batches_mix_long_contexts_and_train_on_the_answer():
    import random

    from solopo_kernels.data.cli import tiny_tokenizer_for
    from solopo_kernels.data.contexts import TEMPLATES

    lexicon = Lexicon.build()
    template = TEMPLATES["cot"]
    tok = tiny_tokenizer_for([template.header, template.footer, *lexicon.words()])
    questions = make_split(lexicon, "sft0", 8, 0)
    rng = random.Random(0)
    lengths = set()
    for _ in range(6):
        batch = _sft_batch(tok, questions, rng, 5, 0.5, completion_only=True)
        mask = batch["attention_mask"].bool()
        lengths.add(batch["input_ids"].shape[1])
        for row, question in enumerate(questions):
            labelled = batch["labels"][row][batch["labels"][row] != -100]
            answer = tok.decode(labelled, skip_special_tokens=True)
            # the loss is on the answer alone, and the whole answer
            assert answer.replace(" ", "") == question["reference"].lower().replace(" ", "")
            prompt = mask[row] & (batch["labels"][row] == -100)
            text = tok.decode(batch["input_ids"][row][prompt])
            for title in {p["title"] for p in question["passages"]}:
                # no second biography of the question's people: every distractor is someone else
                assert text.lower().count(f"{title.lower()} was born in") == 1
    assert len(lengths) > 1  # short batches and long ones


def test_the_distractor_cap_grows_by_one_per_ramp_interval_up_to_the_maximum():
    config = FULL.sft  # from 2, one more every 250 mixed steps, at most 12
    assert [config.distractor_cap(step) for step in (1, 249, 250, 499, 500, 2500, 10**6)] == [
        2,
        2,
        3,
        3,
        4,
        12,
        12,
    ]
    assert SFTConfig(distractor_ramp_every=0).distractor_cap(1) == SFTConfig().max_distractors


def test_fine_tuning_switches_from_short_to_mixed_batches_at_the_switch_accuracy(
    monkeypatch, tmp_path
):
    """The two phases as the fine-tuning loop runs them, with scripted dev checks: short batches
    with the whole sequence in the loss until a check reaches ``switch_accuracy``; then long
    batches with the ramped cap and the answer-only loss; the stop at the first check that passes
    the gate, and the record of it."""
    import dataclasses

    from solopo_kernels.data.cli import tiny_tokenizer_for

    config = SFTConfig(
        batch_size=2,
        max_steps=40,
        check_every=2,
        check_questions=2,
        switch_accuracy=0.45,
        target_accuracy=0.55,
        target_long_accuracy=0.15,
        distractor_ramp_start=1,
        distractor_ramp_every=3,
        max_distractors=3,
    )
    preset = dataclasses.replace(QUICK, sft=config)
    work = Workspace(tmp_path, tmp_path / "results")
    for n in preset.eval_lengths:
        work.contexts("dev", n).parent.mkdir(parents=True, exist_ok=True)
        work.contexts("dev", n).write_text('{"id": "q"}\n')
    tok = tiny_tokenizer_for(["a b c d e"])
    batches = []

    def fake_batch(tokenizer, questions, rng, cap, long_fraction, completion_only=False):
        batches.append((cap, long_fraction, completion_only))
        ids = torch.tensor([[2, 3, 4, 5]] * len(questions))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    # checks at steps 2, 4, 6, ...: short 0.3, 0.5 (the switch), then 0.6 with 512 tokens at
    # 0.1, 0.1, 0.2 (the gate, at step 10)
    script = iter([(0.3, 0.0), (0.5, 0.0), (0.6, 0.1), (0.6, 0.1), (0.6, 0.2), (0.9, 0.9)])

    def fake_eval(model, tokenizer, rows, **kwargs):
        short, long = next(script)
        return {"accuracy": {"short": short, **{n: long for n in rows}}}

    monkeypatch.setattr(pipeline, "_sft_batch", fake_batch)
    monkeypatch.setattr(pipeline, "evaluate_contexts", fake_eval)
    record = pipeline.train_starting_model(preset, work, Lexicon.build(), tok)
    assert record["steps"] == 10 and record["gate"]["met"] is True
    assert [c["mixed"] for c in record["checks"]] == [False, False, True, True, True]
    short, mixed = batches[:4], batches[4:]
    assert all(fraction == 0.0 and not answer_only for _, fraction, answer_only in short)
    assert all(
        fraction == config.long_fraction and answer_only for _, fraction, answer_only in mixed
    )
    assert [cap for cap, _, _ in mixed] == [1, 1, 2, 2, 2, 3]  # mixed steps 1-6, one more per 3
    assert (work.starting_model / "sft_record.json").exists()


def test_a_starting_model_below_its_gate_stops_the_pipeline_before_the_pairs(monkeypatch, tmp_path):
    record = {
        "gate": {"length": 256, "short": 0.55, "long": 0.15, "met": False},
        "checks": [{"step": 4, "dev_accuracy": {"short": 0.6, "256": 0.05, "320": 0.0}}],
    }
    for name in ("make_questions", "build_contexts"):
        monkeypatch.setattr(pipeline, name, lambda *args: None)
    monkeypatch.setattr(pipeline, "make_tokenizer", lambda *args: None)
    monkeypatch.setattr(pipeline, "train_starting_model", lambda *args: record)

    def no_sampling(*args):
        raise AssertionError("sample-pairs ran with a starting model below its gate")

    monkeypatch.setattr(pipeline, "sample_pairs", no_sampling)
    with pytest.raises(RuntimeError, match=r"did not meet its dev gate .* 5% at 256"):
        pipeline.prepare(QUICK, Workspace(tmp_path, tmp_path / "results"))


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
    # alpha is chosen on dev for the SoLo arms, on top of X's chosen setting.
    for arm, hparams in chosen.items():
        if arm.startswith("SoLo-"):
            x_arm = arm.removeprefix("SoLo-").removesuffix(" RA-long")
            assert hparams["alpha"] in QUICK.alphas
            assert {k: v for k, v in hparams.items() if k != "alpha"} == chosen[x_arm]
            assert len(selection[arm]["tried"]) == len(QUICK.alphas)
        else:
            assert "alpha" not in hparams
    units = {
        "dev": sweep_units(QUICK) + alpha_units(QUICK, chosen),
        "test": grid_units(QUICK, chosen),
    }
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
            expected_gradient = "long" if result["unit"]["variant"] == "solo-long" else "both"
            assert result["unit"]["ra_gradient"] == expected_gradient
            if result["unit"]["variant"] != "base":
                cost = result["cost"]
                assert cost["steps"] == QUICK.steps
                assert (
                    math.isfinite(cost["step_seconds_median"]) and cost["step_seconds_median"] > 0
                )
                assert all(math.isfinite(entry["loss"]) for entry in cost["log"])

    report = json.loads((results / "replication.json").read_text())
    assert len(report["summary"]["arms"]) == 13  # the starting model and 12 arms
    for arm in report["summary"]["arms"].values():
        for stats in (*arm["accuracy"].values(), arm["long_avg"]):
            assert 0.0 <= stats["mean"] <= 100.0 and math.isfinite(stats["std"])
    assert report["pairs"]["pairs"] > 0
    gate = report["starting_model"]["gate"]
    assert gate["length"] == max(QUICK.train_lengths) and gate["met"] is True
    # the curve at every eval length up to the gate's
    checked = {"short", *(str(n) for n in QUICK.eval_lengths if n <= max(QUICK.train_lengths))}
    assert all(set(c["dev_accuracy"]) == checked for c in report["starting_model"]["checks"])
    against = {(row["arm"], row["against"]) for row in report["comparisons"]}
    assert ("SoLo-SimPO RA-long", "SoLo-SimPO") in against
    table = (results / "replication.md").read_text()
    assert "| **SoLo-SimPO** |" in table and "| **SoLo-SimPO RA-long** |" in table
    assert "expand-long" in table and "(chosen)" in table
    # the fine-tuning curve (QUICK mixes from the first step)
    assert all(f"| {c['step']} | mixed |" in table for c in report["starting_model"]["checks"])
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
