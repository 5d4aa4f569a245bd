"""The README's tiny end-to-end run: it trains offline, lowers the loss and SoLo-RA distance, and
ends with a verdict that judges its own numbers."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_tiny_solopo.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_tiny_solopo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(**values: float) -> dict[str, float]:
    return {f"eval_{key.replace('__', '/')}": value for key, value in values.items()}


# The default run's numbers (SoLo-SimPO, 32 held-out pairs), as printed at commit time.
BEFORE = _metrics(
    loss=0.8356, solo_ra__distance=0.4137, rewards__margins=0.6592, rewards__accuracies=1.0
) | {"eval_rewards/chosen": -0.5464}
AFTER = _metrics(
    loss=0.6340, solo_ra__distance=0.2616, rewards__margins=0.9714, rewards__accuracies=1.0
) | {"eval_rewards/chosen": -1.0333}


def test_verdict_says_what_moved_and_explains_a_falling_chosen_reward():
    example = _example()
    lines = example.verdict(BEFORE, AFTER, "simpo", 32)
    assert lines[0] == "Verdict: the run did what SoLoPO should (32 held-out pairs):"
    text = "\n".join(lines)
    for key in ("loss", "solo_ra/distance", "rewards/margins"):
        assert key in text.split("moved as expected:")[1].splitlines()[0]
    assert "NOT" not in text
    assert "already 1.00 at the start" in text  # accuracy saturated: neither success nor failure
    assert "rewards/chosen fell" in text and "SIMPO" in text and "rejected" in text

    # A run where the margin shrank while the loss fell (the 3-pair --data run of the issue).
    worse = AFTER | {"eval_rewards/margins": 0.5, "eval_rewards/chosen": -0.1}
    lines = example.verdict(BEFORE, worse, "dpo", 32)
    text = "\n".join(lines)
    assert lines[0] == "Verdict: 1 of the expected moves did not happen (32 held-out pairs):"
    assert "did NOT move as expected: rewards/margins 0.6592 -> 0.5000" in text
    assert "rewards/chosen fell" not in text  # it rose here

    # Too few pairs: no verdict either way, whatever moved, and the headline says so.
    for after in (AFTER, worse):
        lines = example.verdict(BEFORE, after, "dpo", 3)
        assert lines[0] == "Verdict: none: 3 held-out pairs are too few to judge (16 or more):"
        assert lines[1].startswith("  Only 3 held-out pairs: too few")


def test_held_out_pairs_are_enough_or_said_to_be_too_few():
    example = _example()
    assert example.held_out_count(4) == 2
    assert example.held_out_count(31) == 7  # the data demo: under 16, the verdict says so
    assert example.held_out_count(64) == example.MIN_HELD_OUT
    assert example.held_out_count(1000) == 100
    for n in range(4, 400):
        assert 2 <= example.held_out_count(n) <= max(2, n // 4)


@pytest.mark.slow
def test_tiny_run_lowers_loss_and_distance():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(r"^\s+(\S+)\s+(-?[\d.]+)\s+(-?[\d.]+)$", result.stdout, re.M)
    }
    start, end = table["loss"]
    assert end < start, result.stdout
    start, end = table["solo_ra/distance"]
    assert end < start, result.stdout
    assert "Verdict: the run did what SoLoPO should (32 held-out pairs):" in result.stdout
