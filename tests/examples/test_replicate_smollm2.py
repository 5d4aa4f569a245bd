"""The SmolLM2 replication: the biography world (natural names, splits disjoint in people), the
paired statistics, and the script's plumbing (``--quick``: a tiny random Llama through
build-contexts, sample-pairs, LoRA training of every arm, ``solopo-data evaluate``, the report;
a rerun skips finished units; a stopped grid reports what it has, labelled partial). Not the outcome: the quick preset's model cannot answer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "replicate_smollm2.py"
# examples/ goes on the path only for these imports (see test_replicate_solopo.py).
sys.path.insert(0, str(EXAMPLES))
try:
    from smollm2_replication.biographies import FACTS, SPLIT_BLOCKS, make_split, name_block
    from smollm2_replication.config import FULL, QUICK
    from smollm2_replication.grid import alpha_units, base_units, grid_units, sweep_units
    from smollm2_replication.stats import accuracy, paired
finally:
    sys.path.remove(str(EXAMPLES))

from solopo_kernels.data.evaluate import mcnemar_p  # noqa: E402
from solopo_kernels.data.judge import make_sub_em_judge  # noqa: E402


def _people(rows):
    """Every full name of a split: biography titles and the people they mention."""
    names = set()
    for row in rows:
        for passage in (*row["passages"], *row["distractors"]):
            names.add(passage["title"])
    return names


def test_biographies_are_consistent_and_answerable_from_the_passage_alone():
    rows = make_split("test", 200)
    titles = [p["title"] for row in rows for p in (*row["passages"], *row["distractors"])]
    assert len(titles) == len(set(titles))  # one biography per person in a split
    judge = make_sub_em_judge()
    for row in rows:
        [answer] = row["answers"]
        [passage] = row["passages"]
        subject = passage["title"]
        assert subject in row["question"]
        assert answer in passage["text"] and judge(passage["text"], row["answers"])
        assert passage["text"].count(".") == len(FACTS)  # five facts, one sentence each
        # the same fact of the other people in the row is another value (or it could not
        # tell who is asked about)
        assert all(subject not in p["text"] for p in row["distractors"])
    asked = [row["metadata"]["fact"] for row in rows]
    assert {asked.count(key) for key in FACTS} == {40}  # balanced over the five facts


def test_splits_are_disjoint_in_people():
    blocks = {split: set(name_block(split)) for split in SPLIT_BLOCKS}
    for first in blocks:
        for second in blocks:
            if first < second:
                assert not blocks[first] & blocks[second]
    people = {split: _people(make_split(split, 60)) for split in ("train", "dev", "test")}
    assert not people["train"] & people["dev"]
    assert not people["dev"] & people["test"]
    assert not people["train"] & people["test"]
    for split, names in people.items():
        assert names <= blocks[split]
    # mentioned spouses and mentors come from the split's block too
    for row in make_split("dev", 30):
        text = " ".join(p["text"] for p in (*row["passages"], *row["distractors"]))
        mentioned = {name for name in blocks["dev"] if name in text}
        assert mentioned and mentioned <= blocks["dev"]


def test_split_is_reproducible_and_seeded():
    assert make_split("dev", 10) == make_split("dev", 10)
    assert make_split("dev", 10, seed=1) != make_split("dev", 10)
    with pytest.raises(ValueError, match="split"):
        make_split("holdout", 3)


def test_grid_stages():
    assert [(u.arm, u.split) for u in base_units()] == [("base", "dev"), ("base", "test")]
    stage1 = sweep_units(FULL)
    rates = len(FULL.learning_rates)
    assert [u.arm for u in stage1] == ["base"] + ["SimPO"] * rates + ["SimPO expand-long"] * rates
    chosen = {"SimPO": {"lr": 5e-5}, "SimPO expand-long": {"lr": 2e-4}}
    stage2 = alpha_units(FULL, chosen)
    assert {u.hparams["alpha"] for u in stage2} == set(FULL.alphas)
    assert all(u.hparams["lr"] == 5e-5 and u.seed == FULL.seeds[0] for u in stage2)
    chosen |= {
        "SoLo-SimPO": {"lr": 5e-5, "alpha": 1.0},
        "SoLo-SimPO RA-long": {"lr": 5e-5, "alpha": 3.0},
    }
    units = grid_units(FULL, chosen)
    assert len(units) == 1 + 4 * len(FULL.seeds)
    assert [u.seed for u in units[1:5]] == [FULL.seeds[0]] * 4  # seed by seed
    # the test phase's first seed is the dev phase's run (same arm, setting and seed): the same
    # adapter, reused
    dev_keys = {u.model_key for u in (*stage1, *stage2)}
    assert {u.model_key for u in units[1:5]} <= dev_keys
    assert not {u.model_key for u in units[5:]} & dev_keys


def test_accuracy_standard_error_is_over_questions():
    stats = accuracy(["1100", "1010", "1000"])
    c = np.array([1.0, 1 / 3, 1 / 3, 0.0])  # per question: the share of seeds right
    assert stats["mean"] == pytest.approx(c.mean())
    assert stats["se"] == pytest.approx(c.std(ddof=1) / 2)
    assert stats["seed_std"] == pytest.approx(np.std([0.5, 0.5, 0.25], ddof=1))


def test_paired_comparison_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(1)
    questions = 200

    def arm(p, seeds=3):
        return ["".join("1" if x else "0" for x in rng.random(questions) < p) for _ in range(seeds)]

    better = {"512": arm(0.6), "1024": arm(0.5)}
    worse = {"512": arm(0.3), "1024": arm(0.2)}
    result = paired(better, worse, ["512", "1024"], samples=2000)
    assert result["difference"] == pytest.approx(0.3, abs=0.06)
    assert result["ci95"][0] > 0 and result["p_bootstrap"] < 0.01
    assert result["seeds_ahead"] == 3 and result["mde"] < result["difference"]
    for test, s in zip(result["mcnemar"], range(3), strict=True):
        a = better["512"][s] + better["1024"][s]
        b = worse["512"][s] + worse["1024"][s]
        only_a = sum(x > y for x, y in zip(a, b, strict=True))
        only_b = sum(x < y for x, y in zip(a, b, strict=True))
        assert test == {"only_first": only_a, "only_second": only_b, "p": mcnemar_p(only_a, only_b)}
    same = paired(better, better, ["512"], samples=2000)
    assert same["difference"] == 0 and same["p_bootstrap"] == 1.0
    noise = paired({"512": arm(0.4)}, {"512": arm(0.4)}, ["512"], samples=2000)
    assert noise["ci95"][0] < 0 < noise["ci95"][1]


def _run(work: Path, results: Path) -> subprocess.CompletedProcess:
    # the checkout's package, not whichever one the interpreter has installed
    path = os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    command = [sys.executable, str(SCRIPT), "--quick", "--work-dir", str(work)]
    command += ["--results", str(results), "--jobs", "1"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2-quick")
    results = work / "results"
    run = _run(work, results)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work, results


def test_quick_run_writes_every_result(quick_run):
    work, results = quick_run
    report = json.loads((results / "smollm2_replication.json").read_text())
    columns = ["short", *map(str, QUICK.test_lengths)]
    assert report["summary"]["columns"] == columns
    arms = report["summary"]["arms"]
    assert list(arms) == ["base", "SimPO", "SimPO expand-long", "SoLo-SimPO", "SoLo-SimPO RA-long"]
    for name, arm in arms.items():
        seeds = [0] if name == "base" else list(QUICK.seeds)
        assert arm["seeds"] == seeds
        for column in columns:
            stats = arm["accuracy"][column]
            assert 0 <= stats["mean"] <= 1 and math.isfinite(stats["se"])
            assert stats["questions"] == QUICK.test_eval_questions < QUICK.test_questions
        if name != "base":
            assert arm["step_seconds"] > 0 and arm["steps"] >= 1
            by_seed = arm["step_seconds_by_seed"]
            assert len(by_seed) == len(seeds) and all(seconds > 0 for seconds in by_seed)
            assert "alpha" in arm["hparams"] or not name.startswith("SoLo")
    assert report["comparisons"] and all("long" in row for row in report["comparisons"])
    assert report["sampling"]["pairs"] >= 1
    # the pairs the arms trained on go with the results
    assert (results / "pairs" / "train.jsonl").read_bytes() == (
        work / "pairs" / "train.jsonl"
    ).read_bytes()
    table = (results / "smollm2_replication.md").read_text()
    assert "| **SoLo-SimPO** |" in table and "Paired comparisons" in table
    for name, arm in arms.items():
        label = f"**{name}**" if name.startswith("SoLo") else name
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        by_seed = " / ".join(f"{seconds:.1f}" for seconds in arm["step_seconds_by_seed"])
        assert (by_seed or "| - |") in row
    assert (results / "smollm2_replication.png").stat().st_size > 0
    # every unit kept its evaluate report (every answer) and its adapter; no merged copy is left
    for unit_file in (results / "units" / "test").glob("*.json"):
        unit = json.loads(unit_file.read_text())
        answers = json.loads((results / "answers" / "test" / unit_file.name).read_text())
        assert len(answers["answers"]) == QUICK.test_eval_questions * (1 + len(QUICK.test_lengths))
        if unit["unit"]["variant"] != "base":
            assert (work / "adapters" / unit_file.stem / "adapter_config.json").exists()
    assert not any((work / "merged").glob("*"))


def _main_here(work: Path, results: Path, *extra: str) -> int:
    """The script's main in this process: a rerun with nothing to train pays no second start of
    torch, transformers and TRL (the pool starts no worker when no unit is submitted)."""
    spec = importlib.util.spec_from_file_location("replicate_smollm2", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(script)
        argv = ["--quick", "--work-dir", str(work), "--results", str(results), "--jobs", "1"]
        return script.main([*argv, *extra])
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(EXAMPLES))  # the script puts examples/ first on the path


def test_quick_rerun_skips_finished_units_and_a_stopped_grid_reports_partial(quick_run):
    work, results = quick_run
    before = {p: p.stat().st_mtime_ns for p in (results / "units").rglob("*.json")}
    assert _main_here(work, results) == 0
    after = {p: p.stat().st_mtime_ns for p in (results / "units").rglob("*.json")}
    assert after == before
    report = json.loads((results / "smollm2_replication.json").read_text())
    assert report["run"]["complete"] and report["units_done"] == {"dev": 7, "test": 9}
    # a grid stopped with a unit left (no time to start it) still reports what it has
    missing = sorted((results / "units" / "test").glob("simpo-solo-*seed1.json"))[0]
    kept = missing.read_bytes()
    missing.unlink()
    try:
        assert _main_here(work, results, "--max-minutes", "0") == 3
        assert not missing.exists()
        report = json.loads((results / "smollm2_replication.json").read_text())
        assert not report["run"]["complete"] and report["units_done"] == {"dev": 7, "test": 8}
        table = (results / "smollm2_replication.md").read_text()
        assert table.startswith("**Partial results: the grid stopped with units left** (7 dev")
        assert report["summary"]["arms"]["SoLo-SimPO"]["seeds"] == [0]
    finally:
        missing.write_bytes(kept)


def test_a_unit_evaluated_on_other_questions_stops_the_report(quick_run):
    work, results = quick_run
    path = sorted((results / "units" / "test").glob("simpo-short-*seed1.json"))[0]
    kept = path.read_bytes()
    unit = json.loads(kept)
    unit["questions"] = {column: n + 1 for column, n in unit["questions"].items()}
    unit["correct"] = {column: bits + "0" for column, bits in unit["correct"].items()}
    path.write_text(json.dumps(unit))
    try:
        with pytest.raises(ValueError, match="different numbers of questions"):
            _main_here(work, results)
    finally:
        path.write_bytes(kept)


def test_vllm_runs_on_every_core_unless_told_otherwise(monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from smollm2_replication.pipeline import vllm_env
    finally:
        sys.path.remove(str(EXAMPLES))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cores = sorted(os.sched_getaffinity(0))
    assert vllm_env()["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert vllm_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0"
