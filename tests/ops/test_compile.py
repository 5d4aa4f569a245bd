"""The Triton kernels through Triton's real compiler for sm_90, without a GPU: what the interpreter
hides (it does not specialise arguments, nor type-check what the compiler rejects). Each kernel
of each Triton backend is compiled for an H100/H200 target with its first autotuning config, at
the compile report's shape, with the split count 1, which Triton turns into a compile-time
constant (a ``.to`` on it once broke the TMA forward). Runs in a fresh process, since the test
session has Triton in interpreter mode; ``benchmarks/compile_report.py`` does the compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import json, sys
sys.argv = ["compile_report"]
sys.path.insert(0, "benchmarks")
import compile_report as cr

results = {}
for dtype_name in ("bf16", "fp32"):
    for launch in cr.captured_launches(cr.DTYPES[dtype_name]):
        fn = launch["fn"]
        if "n_splits" in fn.arg_names:  # one split: an argument Triton specialises to 1
            args = list(launch["args"])
            args[fn.arg_names.index("n_splits")] = 1
            launch["args"] = tuple(args)
        options = cr.configs_for(launch, dtype_name)[0][1]
        result = cr.compile_one(launch, options, 90)
        results[f"{launch['kernel']} {dtype_name}"] = result.get("error") or result["registers"]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_with_specialised_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k.split()[0] for k in results} >= {"forward", "dlogits", "tma_forward", "tma_dlogits"}
    failed = {k: v for k, v in results.items() if not isinstance(v, int)}
    assert not failed, failed
