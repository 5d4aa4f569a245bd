"""The Triton kernels through Triton's real compiler, without a GPU: what the interpreter hides (it
does not specialise arguments, allocate registers, nor type-check what the compiler rejects).

* The flag combinations the public API can reach (``benchmarks/compile_matrix.py``: the five
  kernels, rows and head dtypes with ``ROUND_HEAD``, bias, ``SAVE_LOGITS`` / ``TRACK_MAX``,
  ``DOT_PRECISION``, ``EVEN_K``, the TMA forward with one split and with eight) compile to a
  cubin for sm_90, and those with bf16 rows (what Blackwell trains in) for sm_100 too, each with
  a config the autotuner keeps for it (cycling through them); no kept config spills registers;
  and the registers and spills are those of the committed data the spill table is made from (so
  a kernel change that moves them fails here until the data and the table are regenerated). In a
  fresh process, since the test session runs Triton in interpreter mode. CI compiles the
  representative subset (every value of every flag once per kernel, the trainer's path: 36
  compiles on two workers; the CI time is in docs/kernels.md); every combination (200 compiles)
  with ``SOLOPO_COMPILE_ALL=1``.
* The pruning (``triton_configs.spills``, from ``ops/triton_spills.py``) against the committed
  ``--all-configs`` data, every config of every combination, sm_80, sm_90 and sm_100: a config is
  pruned exactly when ptxas reported spills. Cheap: no compile.
* The same check with fresh compiles of every config for sm_90 (~600 compiles, tens of minutes):
  not in CI; ``SOLOPO_COMPILE_ALL=1 python -m pytest tests/ops/test_compile.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend")

import triton  # noqa: E402

from solopo_kernels.ops import triton_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "benchmarks" / "results" / "compile" / f"matrix_triton-{triton.__version__}.json"
COMMITTED_VERSION = "3.9.0"  # the Triton version of the committed data and the spill table
REGENERATE = (
    "regenerate the data and the table: python benchmarks/compile_matrix.py --all-configs "
    "--arch 90 100 80 --rows fp32 bf16 --out benchmarks/results/compile/matrix_triton-<version>.json "
    "--write-table"
)


def _matrix(tmp_path: Path, *args: str) -> dict:
    """Run benchmarks/compile_matrix.py in a fresh process; its JSON output."""
    out = tmp_path / "matrix.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "benchmarks/compile_matrix.py", *args, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    failed = [f"{r['case']} {r['config']} {r['arch']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    assert done.returncode == 0, done.stderr[-3000:]
    return result


def _committed() -> dict[tuple[str, str, str], dict]:
    if not DATA.exists():
        pytest.skip(f"no committed compile data for Triton {triton.__version__} ({DATA.name})")
    rows = json.loads(DATA.read_text())["rows"]
    return {(r["case"], r["config"], r["arch"]): r for r in rows}


def _spilled(row: dict) -> bool:
    return bool(row["spill_stores"] or row["spill_loads"])


def _compile_matrix():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compile_matrix
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return compile_matrix


def _check_compiled(rows: list[dict], cases: list) -> None:
    """Each case compiled for sm_90, the bf16 ones for sm_100 too, with kept configs only (none
    spills: no all-spill case here), and ptxas answers what the committed data says."""
    assert {r["case"] for r in rows if r["arch"] == "sm_90"} == {c.name for c in cases}
    bf16 = {c.name for c in cases if c.rows == "bf16"}
    assert {r["case"] for r in rows if r["arch"] == "sm_100"} == bf16
    assert all(r["kept"] for r in rows)
    spilled = [f"{r['case']} {r['config']} {r['arch']}" for r in rows if _spilled(r)]
    assert not spilled, spilled
    if triton.__version__ != COMMITTED_VERSION:
        return
    # The compiler still answers what the committed data (the spill table's source) says. fp16
    # rows are checked against bf16's data (the table reads fp16 as bf16): the same spill verdict.
    committed = _committed()
    moved = []
    for r in rows:
        name = r["case"].replace("fp16", "bf16")
        was = committed[(name, r["config"], r["arch"])]
        now = (r["registers"], r["spill_stores"], r["spill_loads"])
        before = (was["registers"], was["spill_stores"], was["spill_loads"])
        if now != before if name == r["case"] else _spilled(r) != _spilled(was):
            moved.append(f"{r['case']} {r['config']} {r['arch']}: {now}, committed {before}")
    assert not moved, f"{len(moved)} compiles moved; {REGENERATE}:\n" + "\n".join(moved[:20])


def test_the_representative_subset_has_every_flag_value_of_every_kernel():
    """What CI compiles (below) is a subset of the combinations: for each kernel, every value
    of every flag the public API can set is in it, and so are the trainer's documented path
    (bf16 rows, float32 head rounded per tile, bias, saved logits) and the plain bf16 one."""
    cm = _compile_matrix()
    every, subset = cm.cases(), cm.representative_cases()
    assert set(subset) <= set(every) and len(set(subset)) == len(subset)

    def values(cases: list, kernel: str) -> set:
        out = set()
        for c in cases:
            if c.kernel == kernel:
                out |= {("dtypes", c.rows, c.head), ("dot", c.dot), ("bias", c.bias)}
                out |= {("flag", c.flag), ("even_k", c.even_k), ("rows+dot", c.rows, c.dot)}
        return out

    for kernel in cm.KERNELS:
        assert values(subset, kernel) == values(every, kernel), kernel
    trainer = dict(rows="bf16", head="fp32", bias=True, flag=True, even_k=True)
    plain = dict(rows="bf16", head="bf16", bias=False, flag=False, even_k=True)
    for kernel in cm.KERNELS[:4]:
        for path in (trainer, plain):
            assert cm.Case(kernel, dot="tf32", **path) in subset, (kernel, path)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1 min on two idle cores; far longer on a loaded machine
def test_representative_combinations_compile_and_no_kept_config_spills(tmp_path):
    """CI's compile check: the representative subset (27 combinations for sm_90, 9 with bf16
    rows for sm_100), each with a kept config, cycling through them so that every config kept
    for one of them on sm_90 is compiled for one of them."""
    cm = _compile_matrix()
    result = _matrix(
        tmp_path, "--representative", "--arch", "90", "100", "--bf16-only", "100", "--check-spills"
    )
    rows = result["rows"]
    _check_compiled(rows, cm.representative_cases())
    by_name = {c.name: c for c in cm.representative_cases()}
    compiled = {r["config"] for r in rows if r["arch"] == "sm_90"}
    keepable = {
        cm.config_name(config)
        for r in rows
        if r["arch"] == "sm_90"
        for config in cm.candidate_configs(by_name[r["case"]])
        if cm.kept(by_name[r["case"]], config, 90)
    }
    assert keepable <= compiled, sorted(keepable - compiled)


@pytest.mark.skipif(
    os.environ.get("SOLOPO_COMPILE_ALL") != "1",
    reason="every combination for sm_90 and the bf16 ones for sm_100 (200 compiles, ~5 CPU-min): "
    "SOLOPO_COMPILE_ALL=1 python -m pytest tests/ops/test_compile.py",
)
def test_every_flag_combination_compiles_and_no_kept_config_spills(tmp_path):
    result = _matrix(tmp_path, "--arch", "90", "100", "--bf16-only", "100", "--check-spills")
    rows = result["rows"]
    _check_compiled(rows, _compile_matrix().cases())
    assert len({r["config"] for r in rows if r["kernel"] == "forward"}) >= 4  # configs cycled


def _case_flags(row: dict) -> dict:
    return dict(
        rows=row["rows"],
        round_head=row["head"] != row["rows"],
        bias=row["bias"],
        flag=row["flag"],
        dot=row["dot"],
        hidden=4096 if row["even_k"] else 4104,
        major=int(row["arch"].removeprefix("sm_")) // 10,
    )


def _config(name: str) -> triton.Config:
    by_name = {triton_configs.config_name(c): c for c in triton_configs.CONFIGS}
    return by_name[name]


def test_the_pruning_matches_the_compiler_for_every_config():
    """Every (combination, config, architecture) of the committed --all-configs data: pruned
    exactly when ptxas reported spills, unless every config of the combination spills (then all
    are kept: a spill costs speed, not correctness); and every combination is in the data."""
    committed = _committed()
    spilling: dict[tuple[str, str], list[bool]] = {}
    for (case, _, arch), row in committed.items():
        spilling.setdefault((case, arch), []).append(_spilled(row))
    wrong = []
    for (case, config, arch), row in committed.items():
        if row["kernel"] == "saved_dlogits":
            continue  # one fixed block, no tuning
        kept, _ = triton_configs.kept_configs(row["kernel"], **_case_flags(row))
        pruned = not any(c is _config(config) for c in kept)
        expected = _spilled(row) and not all(spilling[(case, arch)])
        if pruned != expected:
            wrong.append(f"{case} {config} {arch}: pruned={pruned}, spills={_spilled(row)}")
    assert not wrong, f"{len(wrong)} configs; {REGENERATE}:\n" + "\n".join(wrong[:20])
    compile_matrix = _compile_matrix()
    for arch in ("sm_80", "sm_90", "sm_100"):
        measured = {case for case, a in spilling if a == arch}
        wanted = {
            c.name
            for c in compile_matrix.cases()
            if c.rows != "fp16" and not (arch == "sm_80" and c.kernel.startswith("tma"))
        }
        assert measured == wanted, (arch, sorted(wanted - measured)[:5])


def test_the_pruning_on_a_gpu_it_was_not_measured_for_and_when_every_config_spills():
    """A launch on an architecture the data does not cover (sm_120) reads the nearest measured
    one (sm_100); the pruning runs on the launch's own flags (bf16 rows with a float32 head, bias
    and saved logits drop the 64x256 block on sm_90: the review's spill); and a launch whose every
    config spills keeps them all after one RuntimeWarning (a spill costs speed, not correctness),
    checked on the data's real case and by fault injection."""
    from unittest import mock

    import torch

    flags = dict(rows="bf16", round_head=True, bias=True, flag=True, dot="tf32", hidden=4096)
    for config in triton_configs.HALF_CONFIGS:
        assert triton_configs.spills(config, "forward", **flags, major=12) == (
            triton_configs.spills(config, "forward", **flags, major=10)
        )
    rows = torch.empty(2, 4096, dtype=torch.bfloat16)
    args = {"rows_ptr": rows, "H": 4096}
    trainer_path = dict(HAS_BIAS=True, ROUND_HEAD=True, SAVE_LOGITS=True, DOT_PRECISION="tf32")
    kept = triton_configs.configs_for_call(
        triton_configs.CONFIGS, args, kernel="forward", **trainer_path
    )
    names = {triton_configs.config_name(c) for c in kept}
    assert "64x256x64 w8 s3" not in names and "64x64x64 w4 s4" in names
    odd_fp32 = dict(rows="fp32", round_head=False, bias=False, flag=True, dot="tf32x3", hidden=4104)
    assert triton_configs.kept_configs("forward", **odd_fp32, major=10) == (
        triton_configs.FP32_CONFIGS,
        True,
    )  # every config spills there (sm_100 data): all kept
    with (
        mock.patch.object(triton_configs, "spills", lambda *a, **k: True),
        mock.patch.object(triton_configs, "_warned_all_spill", set()),
    ):
        with pytest.warns(RuntimeWarning, match="every autotuning config of the forward kernel"):
            kept = triton_configs.configs_for_call(triton_configs.CONFIGS, args, kernel="forward")
        assert kept == triton_configs.HALF_CONFIGS


@pytest.mark.skipif(
    os.environ.get("SOLOPO_COMPILE_ALL") != "1",
    reason="compiles every config for sm_90 (~600 compiles, tens of minutes): "
    "SOLOPO_COMPILE_ALL=1 python -m pytest tests/ops/test_compile.py",
)
def test_every_config_for_sm90_matches_the_pruning_when_compiled_now(tmp_path):
    result = _matrix(tmp_path, "--arch", "90", "--all-configs")
    wrong = []
    for row in result["rows"]:
        if row["kernel"] == "saved_dlogits":
            continue
        pruned = triton_configs.spills(_config(row["config"]), row["kernel"], **_case_flags(row))
        if pruned != _spilled(row):
            wrong.append(f"{row['case']} {row['config']}: pruned={pruned}, spills={_spilled(row)}")
    assert not wrong, f"{REGENERATE}:\n" + "\n".join(wrong[:30])
