"""DDP and FSDP2 (gloo, 2 CPU processes) against 1 process on the same global batch.

Tolerances: the distributed runs sum the same float32 numbers in another order (each rank pads
its own rows; DDP/FSDP average the two ranks' gradients), so losses agree to 5e-6 and gradients
to 1e-5 relative to their largest entry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from tests import reference  # noqa: E402
from tests.integrations import dist_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
]


def _torchrun(mode: str, out: Path, module: str = "tests.integrations.dist_worker") -> dict:
    """Run ``module`` under torchrun on 2 gloo processes with ``mode`` (if any) and ``out``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two processes on a 2-core machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", module, *([mode] if mode else []), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    # Keep the lines that say why (progress bars and warnings fill stderr otherwise).
    why = [
        line
        for line in proc.stderr.splitlines()
        if "arning" not in line and "examples/s" not in line
    ]
    assert proc.returncode == 0, f"torchrun {mode} failed:\n{proc.stdout[-3000:]}\n" + "\n".join(
        why[-60:]
    )
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return dist_worker.single(str(tmp_path_factory.mktemp("single")))


def _compare(got: dict, want: dict, names: list[str]) -> None:
    reference.assert_close_rel(
        got["loss"], want["loss"], 5e-6, f"loss {got['loss']} vs {want['loss']}"
    )
    for name in names:
        reference.assert_close_rel(got["grads"][name], want["grads"][name], 1e-5, f"grad of {name}")


def test_ddp_two_processes_match_one(tmp_path, single):
    got = _torchrun("ddp", tmp_path / "ddp.pt")
    assert got["grads"].keys() == single["grads"].keys()
    _compare(got, single, list(single["grads"]))


def test_fsdp2_two_processes_match_one(tmp_path, single):
    got = _torchrun("fsdp2", tmp_path / "fsdp2.pt")
    _compare(got, single, list(single["grads"]))
    assert got["grads"]["lm_head.weight"].abs().max() > 0


def test_fsdp2_lm_head_sharded_on_its_own_is_refused(tmp_path):
    got = _torchrun("fsdp2_separate_head", tmp_path / "sep.pt")
    assert got["error"] is not None and "sharded DTensor" in got["error"]
