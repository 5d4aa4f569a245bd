"""SoLoPOTrainer under DeepSpeed ZeRO-3 (2 CPU processes, gloo) against 1 process without
DeepSpeed: the same losses and gradient norms at every step and the same parameters after
``zero3_worker.STEPS`` optimizer steps, for simpo (tied embeddings) and dpo with a reference model.
Every parameter is partitioned, the tiny ``lm_head`` included, for the policy and the reference.

The optimizer is plain SGD without clipping, so that the parameters after the run are a direct
check of the gradients (``lr * sum of the step gradients``). With AdamW, which divides each
element by its own running magnitude, float rounding in elements with small gradients (1e-7 of
the largest) grows to 1e-5..1e-4 of the parameter change: a comparison that could not be tight.

Tolerances, relative to the largest entry of each compared tensor: the two runs add the same
float32 numbers in another order (each process pads its own rows; ZeRO-3 averages the two
processes' gradients in a reduce-scatter), so losses, gradient norms and parameters agree to
1e-5 (measured: about 1e-6 or less). A wrong gradient of any parameter, a missing average over
the processes or a gradient scaled by the process count is orders of magnitude above that.

The lm_head is never gathered by this package under ZeRO-3: DeepSpeed gathers it itself. Inside
the engine's forward a read of a partitioned parameter all-gathers it and registers it as an
external parameter of the running module (the model's root, whose forward our patched forward
is); the root's pre-backward hook gathers it again before the kernel's backward recomputes the
logits. The run below would fail on an empty weight if that did not happen.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from tests import reference  # noqa: E402
from tests.integrations import zero3_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
REL = 1e-5

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install 'solopo-kernels[deepspeed]')",
    ),
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
]


def _zero3_run(loss_type: str, model_dir: Path, out: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two processes on a 2-core machine
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "tests.integrations.zero3_worker", loss_type, str(model_dir), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    # Keep the lines that say why (progress bars and warnings fill stderr otherwise).
    why = [
        line
        for line in proc.stderr.splitlines()
        if "arning" not in line and "examples/s" not in line and "it/s]" not in line
    ]
    assert proc.returncode == 0, f"ZeRO-3 {loss_type} failed:\n{proc.stdout[-3000:]}\n" + "\n".join(
        why[-60:]
    )
    return torch.load(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models")
    zero3_worker.save_models(path)
    return path


@pytest.mark.parametrize("loss_type", zero3_worker.LOSS_TYPES)
def test_zero3_two_processes_match_one(tmp_path, model_dir, loss_type):
    got = _zero3_run(loss_type, model_dir, tmp_path / "zero3.pt")
    want = zero3_worker.train(loss_type, str(model_dir), str(tmp_path / "single"), zero3=False)

    # It really ran ZeRO-3 over 2 processes, with the lm_head weights partitioned.
    setup = got["setup"]
    assert (setup["engine"], setup["processes"], setup["zero_stage"]) == ("DeepSpeedEngine", 2, 3)
    heads = ["policy"] + (["reference"] if loss_type == "dpo" else [])
    assert sorted(setup["lm_head_partition"]) == sorted(heads)
    for local, full in setup["lm_head_partition"].values():
        assert local < full
    assert want["setup"]["processes"] == 1 and want["setup"]["zero_stage"] is None

    steps = zero3_worker.STEPS
    assert got["losses"].shape == want["losses"].shape == (steps,)
    reference.assert_close_rel(got["losses"], want["losses"], REL, "losses")
    reference.assert_close_rel(got["grad_norms"], want["grad_norms"], REL, "gradient norms")
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        assert torch.equal(got["start"][name], want["start"][name]), f"{name}: loaded differently"
        assert not torch.equal(value, want["start"][name]), f"{name}: not trained"
        reference.assert_close_rel(got["params"][name], value, REL, f"parameter {name}")
    worst = max(
        reference.max_relative_error(got["params"][name], value)
        for name, value in want["params"].items()
    )
    print(  # shown with pytest -s
        f"\n{loss_type}: max relative differences over {steps} steps: losses "
        f"{reference.max_relative_error(got['losses'], want['losses']):.1e}, gradient norms "
        f"{reference.max_relative_error(got['grad_norms'], want['grad_norms']):.1e}, "
        f"parameters {worst:.1e}"
    )
