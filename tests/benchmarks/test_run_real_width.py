"""The real-width benchmark's goal arithmetic and arguments, on made-up results (no benchmark
runs): the goal compares each mode of this package with the fastest peer that computes the whole
row and is not this package, and says "misses" when either bound is broken."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import run_real_width as rw
    from harness import CellResult
    from peers import Workload
finally:
    sys.path.remove(str(BENCHMARKS))

MIB = 1 << 20


def _ok(peak_mib: float, seconds: float) -> CellResult:
    return CellResult("ok", peak_bytes=int(peak_mib * MIB), times_s=[seconds], grad_bytes=0)


def test_parse_widths() -> None:
    assert rw.parse_widths("1024x32768x1024,4096X128256x512") == [
        (1024, 32768, 1024),
        (4096, 128256, 512),
    ]
    for bad in ("1024x32768", "1024x0x5", "axbxc"):
        with pytest.raises(argparse.ArgumentTypeError, match="--widths"):
            rw.parse_widths(bad)


def test_goal_against_the_fastest_full_work_peer() -> None:
    cells = [Workload("solopo", 4096, 1024, 1024, 1024, 32768, 1, "simpo", "float32")]
    peers = ["trl", "liger", "cce", "ours", "ours-strict", "ours-all"]
    results = {
        (0, "trl"): _ok(1000, 9.0),
        (0, "liger"): _ok(300, 1.0),  # partial on solopo rows: never the reference
        (0, "cce"): _ok(700, 4.0),
        (0, "ours"): _ok(400, 4.2),  # 1.05x time, 0.57x memory: meets
        (0, "ours-strict"): _ok(130, 5.6),  # too slow: misses
        (0, "ours-all"): _ok(500, 3.9),  # 0.71x memory: misses
    }
    rows = {r["mode"]: r for r in rw.goal_rows(cells, peers, results)}
    assert {r["peer"] for r in rows.values()} == {"cce"}
    assert rows["ours"]["time_ratio"] == pytest.approx(4.2 / 4.0)
    assert rows["ours"]["memory_ratio"] == pytest.approx(400 / 700)
    assert rows["ours"]["meets_goal"]
    assert not rows["ours-strict"]["meets_goal"]
    assert not rows["ours-all"]["meets_goal"]
    text = rw.goal_table(list(rows.values()))
    assert text.count("| meets |") == 1 and text.count("| misses |") == 2


def test_goal_without_a_reference_peer() -> None:
    cells = [Workload("solopo", 4096, 1024, 64, 64, 512, 1, "simpo", "float32")]
    results = {(0, "ours"): _ok(10, 1.0), (0, "cce"): CellResult("OOM", reason="cap")}
    (row,) = rw.goal_rows(cells, ["cce", "ours"], results)
    assert row["peer"] is None and "meets_goal" not in row
    assert "| n/a |" in rw.goal_table([row])


def test_grid_one_cell_per_width_and_length() -> None:
    args = rw.parse_args(["--widths", "64x512x8,128x1024x16", "--long", "256,512", "--no-plot"])
    cells = rw.grid(args)
    assert [(w.hidden, w.vocab, w.response_len, w.long_len) for w in cells] == [
        (64, 512, 8, 256), (64, 512, 8, 512), (128, 1024, 16, 256), (128, 1024, 16, 512),
    ]  # fmt: skip
    assert {w.kind for w in cells} == {"solopo"} and {w.loss_type for w in cells} == {"simpo"}


def test_a_tiny_run_writes_its_report(tmp_path: Path) -> None:
    # End to end through the harness (a child process per peer), on a shape of no cost.
    argv = ["--widths", "32x256x8", "--long", "64", "--short", "32", "--peers", "ours,ours-all"]
    argv += ["--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plot"]
    assert rw.main(argv) == 0
    report = (tmp_path / "real_width.md").read_text()
    assert "### The goal" in report and "solopo-kernels, every logit saved" in report
    cells = json.loads((tmp_path / "real_width.json").read_text())["cells"]
    assert {c["peer"] for c in cells} == {"ours", "ours-all"}
    assert all(c["status"] == "ok" for c in cells)
