"""``python -m solopo_kernels.doctor`` (and ``benchmarks/gpu_check.py``, its caller) on the CPU:
the JSON and the markdown are written, every backend that runs here passes against float64, the
exit status is 0; a backend made wrong on purpose, or a method that raises, makes it 1; a peer
whose import fails is reported, not fatal. The Triton kernels run under the interpreter here
(``--interpret``), at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from solopo_kernels import doctor
from solopo_kernels.ops import torch_tiles

TINY = ["--shapes", "40x24x70", "--warmup", "0", "--iters", "1", "--time-budget", "0"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")


def _run(tmp_path, *extra):
    path = tmp_path / "doctor.json"
    code = doctor.main(["--device", "cpu", *TINY, *extra, "--json", str(path)])
    return code, json.loads(path.read_text())


def test_the_doctor_on_the_cpu_passes_and_writes_its_report(tmp_path, capsys):
    code, report = _run(tmp_path, "--peers", "solopo-torch", "no-such-peer")
    assert code == 0 and report["passed"]
    (shape,) = report["shapes"]
    assert shape["correctness"]["solopo-torch"]["pass"]
    assert max(shape["correctness"]["solopo-torch"]["rel_err"].values()) < 1e-5
    assert shape["results"]["solopo-torch"]["status"] == "ok"
    assert shape["results"]["no-such-peer"]["status"].startswith("unavailable")
    dispatch = {(d["hidden"], d["weight"]): d for d in report["dispatch"]}
    assert dispatch["bfloat16", "float32"]["auto_runs"] == "torch"
    assert dispatch["bfloat16", "bfloat16"]["gemm_route"] == "upcast"
    assert report["versions"]["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "# solopo-kernels doctor" in out and "**Correctness: PASS.**" in out


def test_a_wrong_backend_fails_the_doctor(tmp_path):
    original = torch_tiles.forward

    def wrong(*args, **kwargs):
        logp, lse, saved = original(*args, **kwargs)
        return logp + 1e-2, lse, saved

    with mock.patch.object(torch_tiles, "forward", wrong):
        code, report = _run(tmp_path, "--no-timing")
    assert code == 1 and not report["passed"]
    check = report["shapes"][0]["correctness"]["solopo-torch"]
    assert not check["pass"] and check["rel_err"]["logp"] > doctor.VALUE_TOL


def test_peers_that_need_cuda_are_one_line_each_on_the_cpu(tmp_path, capsys):
    """Liger's and CCE's kernels are Triton GPU kernels: on the CPU each package is one line
    ("cut-cross-entropy: needs CUDA, skipped") and a row with that status, never run (so no
    "0 active drivers" traceback), and not a failure; TRL's chunked log-prob runs."""
    peers = ["cce", "cce-exact", "liger-flce", "trl-chunked-logprob"]
    code, report = _run(tmp_path, "--peers", *peers)
    assert code == 0 and report["passed"]
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines.count("cut-cross-entropy: needs CUDA, skipped") == 1
    assert lines.count("liger-kernel: needs CUDA, skipped") == 1
    assert "Traceback" not in captured.err and "active drivers" not in captured.err
    results = report["shapes"][0]["results"]
    assert {results[k]["status"] for k in ("cce", "cce-exact", "liger-flce")} == {
        "skipped: needs CUDA"
    }
    assert results["trl-chunked-logprob"]["status"] == "ok"
    assert "| cce | skipped: needs CUDA |" in captured.out


def test_on_cuda_the_peers_that_need_it_are_not_skipped():
    """The skip is by device: for a CUDA device the same peers are imported and returned."""
    table = doctor.peer_methods(["cce", "liger-flce"], torch.device("cuda"))
    assert all(callable(table[k]) for k in ("cce", "cce-exact", "liger-flce"))


def test_a_raising_method_and_a_broken_peer_are_reported(tmp_path):
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("CUDA driver too old")

    original = doctor.our_methods

    def methods(args, n, vocab):
        table = original(args, n, vocab)
        table["solopo-torch"] = lambda r, w, t: (_ for _ in ()).throw(ValueError("boom"))
        return table

    with (
        mock.patch.dict(sys.modules, {"cut_cross_entropy": Broken("cut_cross_entropy")}),
        mock.patch.object(doctor, "our_methods", methods),
        mock.patch.object(doctor, "NEEDS_CUDA", set()),  # as on a device CCE runs on
    ):
        code, report = _run(tmp_path, "--peers", "cce")
    assert code == 1
    (shape,) = report["shapes"]
    assert shape["correctness"]["solopo-torch"] == {"pass": False, "error": "ValueError: boom"}
    assert shape["results"]["cce"]["status"].startswith("unavailable: RuntimeError")


@pytest.mark.parametrize("verbose", [False, True])
def test_an_error_is_one_line_and_its_traceback_needs_verbose(tmp_path, capsys, verbose):
    original = doctor.our_methods

    def methods(args, n, vocab):
        table = original(args, n, vocab)
        table["solopo-torch"] = lambda r, w, t: (_ for _ in ()).throw(ValueError("boom"))
        return table

    with mock.patch.object(doctor, "our_methods", methods):
        code, _ = _run(tmp_path, "--peers", "solopo-torch", *(["--verbose"] if verbose else []))
    assert code == 1
    err = capsys.readouterr().err
    assert "correctness of solopo-torch: ValueError: boom" in err
    assert "solopo-torch: ValueError: boom" in err.splitlines()[-1]  # the timed run's line
    assert ("Traceback" in err) == verbose
    assert ("--verbose for the traceback" in err) != verbose


def test_bad_shapes_are_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        doctor.main(["--device", "cpu", "--shapes", "40x24"])
    assert exit_info.value.code == 2


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRETED, reason="needs triton under TRITON_INTERPRET=1")
def test_the_doctor_checks_every_triton_backend_under_the_interpreter(tmp_path):
    code, report = _run(tmp_path, "--interpret", "--dtype", "bfloat16", "--no-timing")
    assert code == 0, report["shapes"][0]["correctness"]
    checked = report["shapes"][0]["correctness"]
    assert set(checked) == {
        "solopo-torch", "solopo-triton", "solopo-triton-tma", "solopo-triton-saved",
        "solopo-triton-fp32-head",
    }  # fmt: skip
    assert checked["solopo-triton-tma"]["tma_used"]
    assert all(c["pass"] for c in checked.values())


def test_gpu_check_is_a_thin_caller_of_the_doctor(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with mock.patch.object(doctor, "main", return_value=0) as main:
        assert gpu_check.main(["--out", str(tmp_path), "--shapes", "8x8x8"]) == 0
    (argv,) = main.call_args.args
    assert argv == [
        "--shapes", "8x8x8", "--json", str(tmp_path / "gpu_check.json"),
        "--markdown", str(tmp_path / "gpu_check.md"),
    ]  # fmt: skip
    assert len(path.read_text().splitlines()) < 60  # no logic of its own
