"""The torch-backend profile runs end to end on a tiny shape and writes its report (no timings
are checked: they belong to the benchmark, not the tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import profile_head
finally:
    sys.path.remove(str(BENCHMARKS))


def test_profile_runs_and_reports(tmp_path: Path) -> None:
    assert (
        profile_head.main(["--shape", "64x32x512", "--repeats", "1", "--out", str(tmp_path)]) == 0
    )
    summary = json.loads((tmp_path / "profile_head.json").read_text())["summary"]
    assert summary["strict (nothing saved)"]["saved_share"] == 0.0
    assert summary["every logit saved"]["saved_share"] == 1.0
    # 8 NHV strict, 6 NHV with every logit saved
    assert summary["strict (nothing saved)"]["flops"] == 8 * 64 * 32 * 512
    assert summary["every logit saved"]["flops"] == 6 * 64 * 32 * 512
    assert "Strict / every logit saved" in (tmp_path / "profile_head.md").read_text()


def test_bad_shape() -> None:
    with pytest.raises(SystemExit):
        profile_head.parse_args(["--shape", "64x32"])
