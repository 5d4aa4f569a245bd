"""examples/smollm2_solopo.py on SmolLM2-135M-Instruct at its smallest settings: it builds the
prompts, samples pairs, trains and prints the before/after table with accuracies that are
shares of the held-out questions. Heavy: several minutes on two cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "smollm2_solopo.py"


@pytest.mark.heavy
def test_the_smallest_run_prints_the_table(smollm2_folder):
    command = [sys.executable, str(SCRIPT), "--train", "4", "--test", "4", "--samples", "2"]
    command += ["--steps", "2", "--long", "256"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = {0.0, 25.0, 50.0, 75.0, 100.0}  # of 4 questions
    rows = re.findall(
        r"^\| (before|after [^|]+) \| ([\d.]+)% \| ([\d.]+)% \|$", result.stdout, re.M
    )
    assert [row[0].split()[0] for row in rows] == ["before", "after"], result.stdout
    assert all(float(x) in shares for row in rows for x in row[1:]), rows
    assert "pairs written in total" in result.stdout
