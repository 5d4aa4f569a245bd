"""Compile every flag combination of the Triton kernels that the public API can reach, for GPUs
that are not here, and read what ptxas made of each (registers, spills).

    python benchmarks/compile_matrix.py --representative --arch 90 100 --bf16-only 100
                                                             # what CI runs: every flag value
                                                             # once per kernel (27 combinations)
    python benchmarks/compile_matrix.py --arch 90 100 --bf16-only 100
                                                             # every combination once (200
                                                             # compiles, ~5 CPU-min)
    python benchmarks/compile_matrix.py --all-configs --arch 90 \\
        --out benchmarks/results/compile/matrix_triton-3.9.0.json
                                                             # every autotuning config of every
                                                             # combination: the spill table's data

A *combination* (:class:`Case`) is a kernel (the pointer forward and its backward tile kernel,
their TMA twins, and the saved-logits tile kernel) with the constexpr flags and pointer dtypes a
call can give it:

* rows and head dtypes: float32, bfloat16, float16, and bf16/fp16 rows with a float32 head
  (``ROUND_HEAD``; the bias has the head's dtype);
* ``HAS_BIAS``; ``SAVE_LOGITS`` (forwards) or ``TRACK_MAX`` (backward tile kernels: opt-in tile
  skipping);
* ``DOT_PRECISION``: float32 rows take ``tf32x3`` (torch's default matmul precision) or ``tf32``
  (``torch.set_float32_matmul_precision("high")``); 16-bit rows ignore it;
* ``EVEN_K`` (pointer kernels): ``H`` a multiple of ``BLOCK_K`` (H = 4096) or not (H = 4104; the
  TMA descriptors zero-fill instead).

The arguments are those a real launch passes at N = 8192, V = 128256 (recorded from the package's
own launch functions on CPU tensors, as ``compile_report.py`` does), so Triton specialises them as
on a GPU. Each compile runs Triton's whole pipeline to a cubin for an explicit target with an
empty cache, and reads ptxas's own ``-v`` log. By default each combination is compiled with one
of the configs the autotuner keeps for it (cycling through them, so that every kept config is
compiled somewhere); ``--all-configs`` compiles every config of the operand dtype's list, kept or
pruned. ``--workers`` compile in parallel (default: one per CPU).

Writes (``--out``) one JSON row per compile: the case, the config, the target, registers, spill
bytes, shared memory, whether the package's pruning keeps the config for this case (and whether
it found every config spilling, when it keeps them all), and the compile time; exits 1 if any
compile failed, or (``--check-spills``) if a kept config spilled where another would not.
``--table-only`` regenerates the pruning's table (``solopo_kernels/ops/triton_spills.py``) from
the committed data; after a kernel change, regenerate both:

    python benchmarks/compile_matrix.py --all-configs --arch 90 100 80 --rows fp32 bf16 \
        --out benchmarks/results/compile/matrix_triton-3.9.0.json --write-table

(fp16 rows compile like bf16: the table reads them as bf16, and CI compiles them against it.)
``tests/ops/test_compile.py`` runs the representative subset in CI (the whole default matrix
with ``SOLOPO_COMPILE_ALL=1``) and checks the committed ``--all-configs`` data against the
pruning rule (``triton_configs.spills``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package from this checkout, no install needed
sys.path.insert(0, str(HERE))

N, V = 8192, 128256
H_EVEN, H_ODD = 4096, 4104  # 4104 = 64 * 64 + 8: no BLOCK_K divides it; rows stay 16-byte aligned
KERNELS = ("forward", "dlogits", "tma_forward", "tma_dlogits", "saved_dlogits")
DTYPE_PAIRS = (
    ("fp32", "fp32"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
)
ARCHS = (90, 100)


@dataclass(frozen=True)
class Case:
    """One flag combination of one kernel. ``flag``: ``SAVE_LOGITS`` for the forwards,
    ``TRACK_MAX`` for the backward tile kernels."""

    kernel: str
    rows: str
    head: str
    bias: bool
    flag: bool
    dot: str
    even_k: bool

    @property
    def fp32(self) -> bool:
        return self.rows == "fp32"

    @property
    def round_head(self) -> bool:
        return self.head != self.rows

    @property
    def name(self) -> str:
        flag = "save" if self.kernel.endswith("forward") else "track"
        parts = [self.kernel, f"{self.rows}/{self.head}", f"dot={self.dot}"]
        parts += [
            f"bias={int(self.bias)}",
            f"{flag}={int(self.flag)}",
            f"even_k={int(self.even_k)}",
        ]
        return " ".join(parts)


def cases() -> list[Case]:
    """Every combination the public API can reach."""
    out = []
    for kernel in KERNELS[:4]:
        even_ks = (True, False) if not kernel.startswith("tma") else (True,)
        for (rows, head), bias, flag, even_k in itertools.product(
            DTYPE_PAIRS, (False, True), (False, True), even_ks
        ):
            for dot in ("tf32x3", "tf32") if rows == "fp32" else ("tf32",):
                out.append(Case(kernel, rows, head, bias, flag, dot, even_k))
    for rows, flag in itertools.product(("fp32", "bf16", "fp16"), (False, True)):
        out.append(Case("saved_dlogits", rows, rows, False, flag, "-", True))
    return out


# The representative subset (``--representative``, what CI compiles): per tile kernel, one case
# per rows/head dtype pair (fp32 rows twice: both dot precisions), with bias, the kernel's flag
# and EVEN_K (pointer kernels) set so that each value of each appears; case 4 is the trainer's
# documented path (bf16 rows, float32 head rounded per tile, bias, saved logits), case 2 the
# plain bf16 one. (rows, head, dot, bias, flag, even_k); TMA kernels always take even_k.
REPRESENTATIVE = (
    ("fp32", "fp32", "tf32x3", False, False, True),
    ("fp32", "fp32", "tf32", True, True, False),
    ("bf16", "bf16", "tf32", False, False, True),
    ("fp16", "fp16", "tf32", True, False, False),
    ("bf16", "fp32", "tf32", True, True, True),
    ("fp16", "fp32", "tf32", False, True, False),
)
REPRESENTATIVE_SAVED = (("fp32", False), ("bf16", True), ("fp16", False))


def representative_cases() -> list[Case]:
    """The subset of :func:`cases` that CI compiles: every value of every flag once per kernel,
    the trainer's path and the plain bf16 path (:data:`REPRESENTATIVE`)."""
    out = []
    for kernel in KERNELS[:4]:
        for rows, head, dot, bias, flag, even_k in REPRESENTATIVE:
            even_k = even_k or kernel.startswith("tma")
            out.append(Case(kernel, rows, head, bias, flag, dot, even_k))
    for rows, flag in REPRESENTATIVE_SAVED:
        out.append(Case("saved_dlogits", rows, rows, False, flag, "-", True))
    return out


def capture(case: Case) -> dict[str, Any]:
    """The launch the package makes for ``case`` (kernel, positional and keyword arguments),
    recorded from its launch functions on CPU tensors of the real sizes (never touched)."""
    import compile_report as cr
    import torch

    from solopo_kernels.ops import triton_kernels as kern
    from solopo_kernels.ops import triton_tiles as tt
    from solopo_kernels.ops import triton_tma_tiles as tma
    from solopo_kernels.ops.tiles import Tiles

    dtypes = cr.DTYPES
    hidden = H_EVEN if case.even_k else H_ODD
    rows = torch.empty(N, hidden, dtype=dtypes[case.rows])
    weight = torch.empty(V, hidden, dtype=dtypes[case.head])
    bias = torch.empty(V, dtype=dtypes[case.head]) if case.bias else None
    targets = torch.zeros(N, dtype=torch.long)
    lse, grad = torch.zeros(N), torch.zeros(N)
    tile = torch.empty(N, 8192, dtype=dtypes[case.rows])
    block_max = torch.zeros(1024) if case.flag else None
    # The TMA forward takes its split count as an argument, which Triton specialises when it is 1
    # (a constant: a .to on it once broke that kernel): one split without bias, eight with.
    splits = 1 if case.kernel == "tma_forward" and not case.bias else 8
    tiles = Tiles(
        N, 8192, saved_columns=8192 if case.flag else 0, splits=splits, dot_precision=case.dot
    )
    forward = dict(temperature=1.0, tiles=tiles, save_logits=case.flag)
    backward = dict(temperature=1.0, block_max=block_max, dot_precision=case.dot)
    jobs = {
        "forward": (tt, "FORWARD_LAUNCHER", kern.forward_kernel,
                    lambda: tt.forward(rows, weight, bias, targets, **forward)),
        "dlogits": (tt, "DLOGITS_LAUNCHER", kern.dlogits_kernel,
                    lambda: tt.launch_dlogits(tile, grad, rows, weight, bias, targets, lse, 0, 0,
                                              **backward)),
        "tma_forward": (tma, "FORWARD_LAUNCHER", tma._tma_forward_kernel,
                        lambda: tma.forward(rows, weight, bias, targets, **forward)),
        "tma_dlogits": (tma, "DLOGITS_LAUNCHER", tma._tma_dlogits_kernel,
                        lambda: tma.launch_tma_dlogits(tile, grad, rows, weight, bias, targets,
                                                       lse, 0, 0, **backward)),
        "saved_dlogits": (kern, "saved_dlogits_kernel", kern.saved_dlogits_kernel,
                          lambda: tt.launch_saved_dlogits(
                              tile, torch.empty(N, 8192), grad, targets, lse, 0, 0,
                              temperature=1.0, block_max=block_max)),
    }  # fmt: skip
    module, attr, fn, call = jobs[case.kernel]
    compatible = tma.tma_compatible
    tma.tma_compatible = lambda *a: True  # the CPU tensors stand in for CUDA ones
    try:
        with cr.recording(module, attr) as recorder:
            call()
    finally:
        tma.tma_compatible = compatible
    ((args, kwargs),) = recorder.calls
    return {"kernel": case.kernel, "fn": fn, "args": args, "kwargs": kwargs}


def candidate_configs(case: Case) -> list[Any]:
    """The operand dtype's autotuning list (:mod:`solopo_kernels.ops.triton_configs`); the
    saved-logits kernel has one fixed block."""
    from solopo_kernels.ops import triton_configs as cfg

    if case.kernel == "saved_dlogits":
        return [None]
    return list(cfg.FP32_CONFIGS if case.fp32 else cfg.HALF_CONFIGS)


def kept(case: Case, config: Any, arch: int) -> bool:
    """Whether the package's pruning keeps ``config`` for ``case`` on ``arch`` (all configs when
    every one spills: see :func:`all_spill`)."""
    if config is None:
        return True
    configs, _ = _pruning(case, arch)
    # By name: in a worker ``config`` is an unpickled copy, never one of the package's objects.
    return config_name(config) in {config_name(c) for c in configs}


def all_spill(case: Case, arch: int) -> bool:
    """Whether the pruning found every config of ``case`` spilling on ``arch`` (then it keeps
    them all, and a kept config spilling is expected)."""
    return case.kernel != "saved_dlogits" and _pruning(case, arch)[1]


def _pruning(case: Case, arch: int) -> tuple[list, bool]:
    from solopo_kernels.ops import triton_configs as cfg

    hidden = H_EVEN if case.even_k else H_ODD
    flags = dict(rows=case.rows, round_head=case.round_head, bias=case.bias, flag=case.flag)
    return cfg.kept_configs(case.kernel, **flags, dot=case.dot, hidden=hidden, major=arch // 10)


def config_options(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_name(config: Any) -> str:
    from solopo_kernels.ops import triton_configs as cfg

    return "fixed" if config is None else cfg.config_name(config)


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_case(job: tuple[Case, Any, int]) -> dict[str, Any]:
    """Compile one (case, config, arch) to a cubin; registers and spills from ptxas's log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    case, config, arch = job
    row: dict[str, Any] = {
        **asdict(case), "case": case.name, "config": config_name(config), "arch": f"sm_{arch}",
        "kept": kept(case, config, arch), "all_spill": all_spill(case, arch),
    }  # fmt: skip
    started = time.perf_counter()
    try:
        launch = capture(case)
        fn = launch["fn"]
        kwargs = {**launch["kwargs"], **config_options(config)}
        if "EVEN_K" in fn.arg_names:  # the launcher's heuristic
            kwargs["EVEN_K"] = launch["args"][fn.arg_names.index("H")] % kwargs["BLOCK_K"] == 0
        for name, block in (
            ("rows_desc", ("BLOCK_N", "BLOCK_K")),
            ("weight_desc", ("BLOCK_V", "BLOCK_K")),
        ):
            if name in fn.arg_names:  # the autotuning pre-hook's job
                launch["args"][fn.arg_names.index(name)].block_shape = [kwargs[k] for k in block]
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, opts = binder(*launch["args"], **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, kwargs, bound, specialization, opts
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target,
                options=options.__dict__,
            )  # fmt: skip
        registers = [int(m) for m in _PTXAS.findall(log.getvalue())]
        spills = [tuple(map(int, m)) for m in _SPILLS.findall(log.getvalue())]
        if not registers or not spills:
            raise RuntimeError(f"no ptxas -v log to read (got {log.getvalue()[:200]!r})")
        row.update(
            registers=max(registers),
            spill_stores=max(s for s, _ in spills),
            spill_loads=max(lo for _, lo in spills),
            shared_bytes=compiled.metadata.shared,
        )
    except Exception as error:  # a combination that does not compile is a row, not a crash
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    row["compile_s"] = round(time.perf_counter() - started, 2)
    return row


def _worker_setup(cache: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache)  # empty: every compile is real
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:  # Linux: a worker dies with its parent (a killed run leaves no compiles behind)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def jobs_for(
    archs: list[int],
    all_configs: bool,
    only: str | None = None,
    bf16_only: tuple[int, ...] = (),
    rows: tuple[str, ...] = (),
    representative: bool = False,
) -> list[tuple[Case, Any, int]]:
    """(case, config, arch) to compile: every config of each case, or one kept config per case,
    cycling through the kept ones; ``only``: the cases whose name matches this regex;
    ``bf16_only``: architectures compiled for the cases with bf16 rows only; ``rows``: only the
    cases with these rows dtypes; ``representative``: only :func:`representative_cases`."""
    out = []
    turn: dict[tuple[int, bool], int] = {}
    for arch in archs:
        for case in representative_cases() if representative else cases():
            if only and not re.search(only, case.name):
                continue
            if (arch in bf16_only and case.rows != "bf16") or (rows and case.rows not in rows):
                continue
            if arch < 90 and case.kernel.startswith("tma"):
                continue  # before sm_90 the TMA backend runs the pointer kernels
            configs = candidate_configs(case)
            if not all_configs:
                keeping = [c for c in configs if kept(case, c, arch)]
                index = turn.get((arch, case.fp32), 0)
                turn[(arch, case.fp32)] = index + 1
                configs = [keeping[index % len(keeping)]]
            out += [(case, config, arch) for config in configs]
    return out


def job_key(case_name: str, config: str, arch: str) -> tuple[str, str, str]:
    return case_name, config, arch


def run(
    archs: list[int],
    all_configs: bool,
    workers: int,
    only: str | None = None,
    bf16_only: tuple[int, ...] = (),
    rows_dtypes: tuple[str, ...] = (),
    done: dict[tuple[str, str, str], dict[str, Any]] | None = None,
    representative: bool = False,
) -> list[dict[str, Any]]:
    """Compile the jobs of :func:`jobs_for`, each row printed as a JSON line when done; rows
    already in ``done`` (keyed by case, config and arch) are reused, not compiled again."""
    done = done or {}
    jobs, rows = [], []
    for case, config, arch in jobs_for(
        archs, all_configs, only, bf16_only, rows_dtypes, representative
    ):
        key = job_key(case.name, config_name(config), f"sm_{arch}")
        if key in done and "error" not in done[key]:
            rows.append(done[key])
        else:
            jobs.append((case, config, arch))
    print(f"{len(jobs)} compiles on {workers} worker(s), {len(rows)} reused", file=sys.stderr)
    with tempfile.TemporaryDirectory() as cache:
        with ProcessPoolExecutor(workers, initializer=_worker_setup, initargs=(cache,)) as pool:
            for row in pool.map(compile_case, jobs, chunksize=1):
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--all-configs", action="store_true", help="every config, kept or pruned")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="the cases whose name matches this regex (e.g. 'forward ')")
    parser.add_argument(
        "--bf16-only", type=int, nargs="*", default=[], metavar="ARCH",
        help="architectures compiled for the combinations with bf16 rows only (CI: 100)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the rows (and the versions) as JSON here")
    parser.add_argument(
        "--rows", nargs="+", choices=("fp32", "bf16", "fp16"), default=[],
        help="only the combinations with these rows dtypes",
    )  # fmt: skip
    parser.add_argument(
        "--resume", type=Path, nargs="+", default=[],
        help="earlier outputs (--out JSON, or the printed JSON lines): their rows are reused",
    )  # fmt: skip
    parser.add_argument(
        "--representative", action="store_true",
        help="only the representative subset (every flag value once per kernel; what CI runs)",
    )  # fmt: skip
    parser.add_argument(
        "--check-spills", action="store_true", help="exit 1 if a config the pruning keeps spills"
    )
    parser.add_argument(
        "--write-table", action="store_true",
        help=f"regenerate {TABLE.relative_to(HERE.parent)} from the data in {DATA_DIR.name}/",
    )  # fmt: skip
    parser.add_argument("--table-only", action="store_true", help="--write-table, compile nothing")
    args = parser.parse_args(argv)
    # Here, not at import (the tests import this module inside a session that runs Triton in its
    # interpreter): before anything imports Triton, compile the GPU configs, not the interpreter's.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    if args.table_only:
        write_table()
        return 0
    done = {}
    for path in args.resume:
        for row in read_rows(path):
            done[job_key(row["case"], row["config"], row["arch"])] = row
    started = time.perf_counter()
    rows = run(
        args.arch, args.all_configs, args.workers, args.only, tuple(args.bf16_only),
        tuple(args.rows), done, args.representative,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    import torch
    import triton

    failed = [r for r in rows if "error" in r]
    spilled = [
        r
        for r in rows
        if r["kept"] and not r.get("all_spill") and (r.get("spill_stores") or r.get("spill_loads"))
    ]
    summary = {
        "triton": triton.__version__, "torch": torch.__version__, "archs": args.arch,
        "all_configs": args.all_configs, "representative": args.representative,
        "bf16_only": args.bf16_only, "compiles": len(rows), "failed": len(failed),
        "kept_and_spilled": len(spilled), "seconds": round(seconds, 1), "workers": args.workers,
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)  # a row per line
        args.out.write_text(json.dumps(summary)[:-1] + ', "rows": [\n' + lines + "\n]}\n")
    print(json.dumps(summary), flush=True)
    if args.write_table:
        write_table()
    for r in failed:
        print(f"FAILED {r['case']} {r['config']} {r['arch']}: {r['error']}", file=sys.stderr)
    for r in spilled if args.check_spills else []:
        print(f"KEPT AND SPILLED {r['case']} {r['config']} {r['arch']}", file=sys.stderr)
    return 1 if failed or (args.check_spills and spilled) else 0


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an ``--out`` JSON, or of the JSON lines this script prints."""
    text = path.read_text()
    try:
        return json.loads(text)["rows"]
    except json.JSONDecodeError:  # JSON lines
        return [json.loads(line) for line in text.splitlines() if line.startswith('{"kernel"')]


DATA_DIR = HERE / "results" / "compile"
TABLE = HERE.parent / "solopo_kernels" / "ops" / "triton_spills.py"


def table_entries() -> tuple[dict[tuple, set[str]], list[str]]:
    """(key -> names of the configs that spill) from every committed ``--all-configs`` matrix
    (``matrix_triton-*.json``) and every Triton version's base compile report
    (``compile_triton-*.json``: no bias, no ``ROUND_HEAD``, ``EVEN_K``); the sources read."""
    from solopo_kernels.ops import triton_configs as cfg

    names = {cfg.config_name(c) for c in cfg.CONFIGS}
    spilling: dict[tuple, set[str]] = {}
    sources = []

    def add(key: tuple, config: str, row: dict) -> None:
        spilling.setdefault(key, set())
        if config in names and (row["spill_stores"] or row["spill_loads"]):
            spilling[key].add(config)

    for path in sorted(DATA_DIR.glob("matrix_triton-*.json")):
        data = json.loads(path.read_text())
        sources.append(f"{path.name} (Triton {data['triton']}, every config)")
        for r in data["rows"]:
            if r["kernel"] == "saved_dlogits" or "error" in r:
                continue
            arch = int(r["arch"].removeprefix("sm_"))
            key = (
                r["kernel"],
                r["rows"],
                r["head"],
                r["dot"],
                r["bias"],
                r["flag"],
                r["even_k"],
                arch,
            )
            add(key, r["config"], r)
    for path in sorted(DATA_DIR.glob("compile_triton-*.json")):
        data = json.loads(path.read_text())
        sources.append(f"{path.name} (Triton {data['triton']}, base flags)")
        for r in data["rows"]:
            if r["status"] != "used" or r["kernel"] == "saved_dlogits" or "error" in r:
                continue
            kernel, save = r["kernel"].removesuffix("+save"), r["kernel"].endswith("+save")
            dot = r["dot_precision"] if r["dtype"] == "fp32" else "tf32"
            arch = int(r["arch"].removeprefix("sm_"))
            dtype = "fp32" if r["dtype"] == "fp32" else "bf16"  # the table reads fp16 as bf16
            key = (kernel, dtype, dtype, dot, False, save, True, arch)
            config = f"{r['block']} w{r['num_warps']} s{r['num_stages']}"
            add(key, config, r)
    return spilling, sources


def write_table() -> None:
    """Write :data:`TABLE`: the configs that spill per kernel, flags and architecture."""
    spilling, sources = table_entries()
    lines = [
        '"""Autotuning configs that spill registers, per kernel, flag combination and architecture,',
        "as ptxas reported them. Generated by ``python benchmarks/compile_matrix.py --table-only``",
        "from benchmarks/results/compile/:",
        "",
        *(f"* {source}" for source in sources),
        "",
        "Do not edit by hand: regenerate (``benchmarks/compile_matrix.py`` says how). Read by",
        ":func:`.triton_configs.spills`. Keys: ``(kernel, rows dtype, head dtype, dot precision,",
        "HAS_BIAS, SAVE_LOGITS or TRACK_MAX, EVEN_K, sm)``, fp16 rows read as bf16; values: the",
        "names (:func:`.triton_configs.config_name`) of the configs that spilled with any of the",
        'Triton versions measured (an empty set when none did; every key measured is listed)."""',
        "",
        "# fmt: off",
        "SPILLING: dict[tuple[str, str, str, str, bool, bool, bool, int], frozenset[str]] = {",
    ]
    for key in sorted(spilling, key=lambda k: (k[7], *map(str, k[:7]))):
        configs = ", ".join(repr(c) for c in sorted(spilling[key]))
        lines.append(
            f"    {key!r}: frozenset({{{configs}}})," if configs else f"    {key!r}: frozenset(),"
        )
    lines += ["}", "# fmt: on"]
    TABLE.write_text("\n".join(lines) + "\n")
    print(f"wrote {TABLE} ({len(spilling)} keys)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
