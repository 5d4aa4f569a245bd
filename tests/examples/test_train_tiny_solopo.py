"""The README's tiny end-to-end run: it trains offline and lowers the loss and SoLo-RA distance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_tiny_solopo.py"


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
