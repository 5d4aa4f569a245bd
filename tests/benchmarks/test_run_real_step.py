"""The whole-step benchmark on real models (benchmarks/run_real_step.py), its plumbing without
the timed run: the pairs it builds (the same question, the long prompt at the length asked, in
the model's own tokens), one step of each trainer on a tiny Llama saved to disk, Liger's refusal
on the CPU, and the report (ratios against the best TRL setup, the longest length within the
cap)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # its modules import each other by name
try:
    import run_real_step as rs
    from harness import CellResult, Unavailable
finally:
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return rs.tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


def _cell(folder: Path, length: int) -> dict:
    return {
        "model": "tiny-llama",
        "folder": str(folder),
        "format": "conversational",
        "long_length": length,
        "gradient_checkpointing": False,
        "cap_bytes": 1 << 30,
    }


def test_the_pair_holds_one_question_at_the_length_asked(tiny):
    tokenizer = rs._tokenizer(str(tiny))
    pair = rs.make_pair(tokenizer, "conversational", 512)
    short, long = pair["prompt"][0]["content"], pair["long_prompt"][0]["content"]
    assert short.split("Question: ")[1] == long.split("Question: ")[1]
    biography = short.split("\n\n")[2]  # header, then the passages
    assert biography in long and len(long) > 3 * len(short)
    ids = tokenizer.apply_chat_template(
        pair["long_prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert 512 - rs.RESPONSE_ROOM - 5 <= len(ids) <= 512 - rs.RESPONSE_ROOM
    company = biography.split("works for ")[1].rstrip(".")
    assert pair["chosen"][0]["content"] == f"The answer is {company}."
    assert company not in pair["rejected"][0]["content"]


def test_more_than_900_people_keep_the_first_900_and_stay_distinct():
    # Gemma's 16K row needs more look-alikes than the 900 plain names; the shorter rows' people
    # (the first 900) must not change, and no name or company may repeat (a repeated name with
    # another company would contradict the gold biography).
    base, more = rs.biographies(900), rs.biographies(2000)
    assert more[:900] == base
    assert len({name for name, _, _ in more}) == len({company for _, _, company in more}) == 2000
    with pytest.raises(ValueError, match="count: at most"):
        rs.biographies(10**6)


@pytest.mark.parametrize("method", ["solopo", "trl-dpo"])
def test_one_step_of_each_trainer_trains(tiny, method):
    cell = rs.build_cell(method, _cell(tiny, 256), torch.device("cpu"), seed=0)
    before = [p.detach().clone() for p in cell.grads]
    loss = cell.step()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(p.grad is not None for p in cell.grads)
    moved = sum(not torch.equal(a, p) for a, p in zip(before, cell.grads, strict=True))
    assert moved > len(before) // 2  # the optimizer stepped


def test_liger_is_refused_on_the_cpu_with_the_reason(tiny):
    with pytest.raises(Unavailable, match="CUDA"):
        rs.build_cell("trl-dpo-liger", _cell(tiny, 256), torch.device("cpu"), seed=0)


def _ok(seconds: float, step_gib: float, base_gib: float = 1.0) -> CellResult:
    gib = 1 << 30
    return CellResult(
        "ok",
        peak_bytes=int(step_gib * gib),
        baseline_bytes=int(base_gib * gib),
        times_s=[seconds],
    )


def test_report_ratios_and_the_longest_length_within_the_cap():
    cells = [
        {"model": "m", "long_length": length, "short_tokens": 100, "long_tokens": length - 50}
        for length in (1024, 2048, 4096)
    ]
    results = {
        (0, "solopo"): _ok(3.0, 1.0),
        (0, "trl-dpo"): _ok(6.0, 3.0),
        (0, "trl-dpo-liger"): _ok(4.0, 2.0),
        (1, "solopo"): _ok(6.0, 2.0),
        (1, "trl-dpo"): _ok(12.0, 11.5),  # 12.5 GiB in all: over the 12 GiB cap
        (1, "trl-dpo-liger"): CellResult("OOM", reason="killed"),
        (2, "solopo"): _ok(12.0, 4.0),
        (2, "trl-dpo"): CellResult("OOM", reason="skipped"),
        (2, "trl-dpo-liger"): CellResult("OOM", reason="skipped"),
    }
    text = rs.report_tables(cells, results, 12 << 30)
    row_1k = next(line for line in text.splitlines() if line.startswith("| 1024 "))
    # Time against the fastest TRL setup (Liger, 4 s), memory against the smallest (Liger, 3 GiB).
    assert row_1k.endswith("| 0.75 | 0.67 |")
    row_2k = next(line for line in text.splitlines() if line.startswith("| 2048 "))
    assert row_2k.endswith("| 0.50 | 0.24 |")  # only the plain TRL step ran
    assert "- SoLoPO (this package): 4096 (the longest measured" in text
    assert "- TRL DPOTrainer expand-long: 1024\n" in text
    assert "- TRL DPOTrainer expand-long + Liger: 1024\n" in text
