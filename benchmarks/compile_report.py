"""Compile every Triton kernel of the package for a GPU that is not here, and report what the
compiler made of each autotuning config: registers, spills, shared memory, CTAs per SM.

    python benchmarks/compile_report.py                  # sm_90 and sm_80, this Triton
    /path/to/other/venv/bin/python benchmarks/compile_report.py   # another Triton: adds a column

No GPU is needed: the kernels' launchers are called on CPU tensors with their launch functions
replaced by a recorder, so the report compiles exactly the arguments (and the runtime
specialization of them: 16-byte aligned pointers, sizes divisible by 16) that a real launch at
H=4096, V=128256, N=8192 would compile, for each config of the autotuning list and for the
candidates the list dropped (:data:`DROPPED`). ``triton.compile`` targets an explicit
``GPUTarget``; the PTX goes through the ptxas Triton ships (the one it uses on a GPU) with ``-v``.

Per kernel, dtype, config and target: registers per thread, spill stores/loads (bytes), static
shared memory (Triton's metadata), whether the K-loop is software-pipelined (``cp.async`` or TMA
copies) and uses ``wgmma``, and the CTAs that fit on one SM (by registers: 64K per SM, allocated
per warp in units of 256; by shared memory: 228 KB per SM on sm_90 and 164 KB on sm_80, 1 KB
reserved per CTA; by threads: 2048). Writes ``compile_triton-<version>.json`` under ``--out``
and regenerates ``compile_report.md`` there from every such JSON (one run per Triton version).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package from this checkout, no install needed
os.environ.pop("TRITON_INTERPRET", None)  # compile the GPU configs, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 = default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from solopo_kernels.ops import triton_configs as cfg  # noqa: E402
from solopo_kernels.ops import triton_kernels as kern  # noqa: E402
from solopo_kernels.ops import triton_tiles as tt  # noqa: E402
from solopo_kernels.ops import triton_tma_tiles as tma  # noqa: E402
from solopo_kernels.ops.tiles import Tiles  # noqa: E402

N, V, H = 8192, 128256, 4096
DEFAULT_OUT = HERE / "results" / "compile"
SMEM_PER_SM = {90: 233472, 80: 167936}
SMEM_PER_BLOCK = {90: 232448, 80: 166912}
# Configs considered and dropped from the autotuning lists (the report shows why).
DROPPED = {
    "half": [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ],
    "fp32": [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Recorder:
    """Stands in for a launcher (``launcher[grid](*args, **kwargs)``) and keeps the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextmanager
def recording(module: Any, name: str) -> Iterator[Recorder]:
    recorder, original = Recorder(), getattr(module, name)
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, original)


def captured_launches(dtype: torch.dtype) -> list[dict[str, Any]]:
    """One recorded launch per kernel: what forward/backward pass at the report's shape."""
    rows = torch.empty(N, H, dtype=dtype)
    weight = torch.empty(V, H, dtype=dtype)
    targets = torch.zeros(N, dtype=torch.long)
    lse, grad = torch.zeros(N), torch.zeros(N)
    tiles = Tiles(N, 8192, saved_columns=0, splits=8, dot_precision=tt.dot_precision(dtype))
    tile = torch.empty(N, 8192, dtype=dtype)
    saved = torch.empty(N, 8192, dtype=torch.float32)
    launches = []
    jobs = [
        ("forward", tt, "FORWARD_LAUNCHER", kern.forward_kernel, lambda: tt.forward(
            rows, weight, None, targets, temperature=1.0, tiles=tiles)),
        ("forward+save", tt, "FORWARD_LAUNCHER", kern.forward_kernel, lambda: tt.forward(
            rows, weight, None, targets, temperature=1.0,
            tiles=Tiles(N, 8192, saved_columns=8192, splits=8, dot_precision=tiles.dot_precision),
            save_logits=True)),
        ("dlogits", tt, "DLOGITS_LAUNCHER", kern.dlogits_kernel, lambda: tt.launch_dlogits(
            tile, grad, rows, weight, None, targets, lse, 0, 0, temperature=1.0,
            block_max=None, dot_precision=tiles.dot_precision)),
        ("tma_forward", tma, "FORWARD_LAUNCHER", tma._tma_forward_kernel, lambda: tma.forward(
            rows, weight, None, targets, temperature=1.0, tiles=tiles)),
        ("tma_dlogits", tma, "DLOGITS_LAUNCHER", tma._tma_dlogits_kernel, lambda: tma.launch_tma_dlogits(
            tile, grad, rows, weight, None, targets, lse, 0, 0, temperature=1.0,
            block_max=None, dot_precision=tiles.dot_precision)),
    ]  # fmt: skip
    if dtype != torch.float32:
        jobs.append(
            ("saved_dlogits", kern, "saved_dlogits_kernel", kern.saved_dlogits_kernel,
             lambda: tt.launch_saved_dlogits(tile, saved, grad, targets, lse, 0, 0,
                                            temperature=1.0, block_max=None))
        )  # fmt: skip
    for name, module, attr, kernel, call in jobs:
        compatible = tma.tma_compatible
        tma.tma_compatible = lambda *a: True  # the CPU tensors stand in for CUDA ones
        try:
            with recording(module, attr) as rec:
                call()
        finally:
            tma.tma_compatible = compatible
        ((args, kwargs),) = rec.calls
        launches.append({"kernel": name, "fn": kernel, "args": args, "kwargs": kwargs})
    return launches


def configs_for(launch: dict[str, Any], dtype_name: str) -> list[tuple[str, dict[str, Any]]]:
    """(status, launch options) per config: the autotuning list's, then the dropped ones."""
    if launch["kernel"] == "saved_dlogits":  # fixed block, passed with the launch
        return [("used", {})]
    family = "fp32" if dtype_name == "fp32" else "half"
    used = cfg.FP32_CONFIGS if family == "fp32" else cfg.HALF_CONFIGS
    out = [("used", c) for c in used] + [("dropped", c) for c in DROPPED[family]]
    return [
        (status, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
        for status, c in out
    ]


def compile_one(launch: dict[str, Any], options: dict[str, Any], arch: int) -> dict[str, Any]:
    fn = launch["fn"]
    kwargs = {**launch["kwargs"], **options}
    if "EVEN_K" in fn.arg_names and "EVEN_K" not in kwargs:  # the heuristic of the launcher
        kwargs["EVEN_K"] = H % kwargs["BLOCK_K"] == 0
    for name, desc_block in (
        ("rows_desc", ("BLOCK_N", "BLOCK_K")),
        ("weight_desc", ("BLOCK_V", "BLOCK_K")),
    ):
        if name in fn.arg_names and "BLOCK_K" in kwargs:  # the autotuning pre-hook's job
            index = fn.arg_names.index(name)
            launch["args"][index].block_shape = [kwargs[k] for k in desc_block]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*launch["args"], **kwargs)
    options_, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, opts
    )
    started = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options_.__dict__)  # fmt: skip
    except Exception as error:  # a config that does not compile is a row, not a crash
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    seconds = time.perf_counter() - started
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    log = subprocess.run(
        [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
        capture_output=True, text=True,
    ).stderr  # fmt: skip
    os.unlink(f.name)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(
        int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    )
    ttgir = compiled.asm["ttgir"]
    warps = options.get("num_warps", kwargs.get("num_warps", 4))
    shared = compiled.metadata.shared
    return {
        "registers": registers,
        "spill_stores": stores,
        "spill_loads": loads,
        "shared_bytes": shared,
        "pipelined": "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir,
        "tma": "async_tma_copy" in ttgir,
        "wgmma": "warp_group_dot" in ttgir,
        "ctas_per_sm": ctas_per_sm(registers, warps, shared, arch),
        "fits_shared": shared <= SMEM_PER_BLOCK[arch],
        "compile_s": round(seconds, 2),
    }


def ctas_per_sm(registers: int, warps: int, shared: int, arch: int) -> int:
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (65536 // per_warp) // warps
    by_shared = SMEM_PER_SM[arch] // (shared + 1024)
    by_threads = 2048 // (32 * warps)
    return max(0, min(by_registers, by_shared, by_threads, 32))


def run(archs: list[int], out: Path, quick: bool = False, dtypes: list[str] | None = None) -> Path:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        if dtypes and dtype_name not in dtypes:
            continue
        for launch in captured_launches(dtype):
            configs = configs_for(launch, dtype_name)
            if dtype_name == "fp16" or quick:  # fp16 compiles like bf16: the used configs only
                configs = [c for c in configs if c[0] == "used"][: 1 if quick else None]
            for status, options in configs:
                for arch in archs:
                    if arch < 90 and launch["kernel"].startswith("tma"):
                        continue  # before sm_90 the TMA backend runs the pointer kernels
                    result = compile_one(launch, options, arch)
                    block = "x".join(str(options.get(k, launch["kwargs"].get(k, "")))
                                     for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K") if k in options
                                     or k in launch["kwargs"])  # fmt: skip
                    row = {
                        "kernel": launch["kernel"], "dtype": dtype_name, "status": status,
                        "block": block, "num_warps": options.get("num_warps", launch["kwargs"].get("num_warps")),
                        "num_stages": options.get("num_stages", "-"), "arch": f"sm_{arch}",
                        "dot_precision": launch["kwargs"].get("DOT_PRECISION", "-"), **result,
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    report = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ptxas": subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"N": N, "V": V, "H": H},
        "rows": rows,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile_triton-{triton.__version__}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def markdown(out: Path) -> str:
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("compile_triton-*.json"))]
    versions = [r["triton"] for r in reports]
    lines = [
        "# Compile report: the Triton kernels for sm_90 and sm_80, without a GPU",
        "",
        "`python benchmarks/compile_report.py` (once per Triton version; each run adds its JSON "
        "and rewrites this file). Shape H=4096, V=128256, N=8192, the arguments a real launch "
        "passes; `regs` = registers per thread, `spill` = spill stores/loads in bytes, `smem` = "
        "static shared memory (KiB), `CTAs/SM` from registers, shared memory and threads, "
        "`pipe` = the K-loop's loads are asynchronous (cp.async or TMA) and overlap the MMAs, "
        "`mma` = wgmma (sm_90) or mma.sync. `used` rows are the autotuning list; `dropped` rows "
        "are candidates left out, with the reason in the numbers.",
        "",
    ]
    for r in reports:
        lines.append(
            f"- Triton {r['triton']}: torch {r['torch']}, Python {r['python']}, {r['ptxas']}, {r['date']}"
        )
    fields = ("kernel", "dtype", "status", "block", "num_warps", "num_stages", "arch")
    merged: dict[tuple, dict[str, dict]] = {}
    for r in reports:
        for row in r["rows"]:
            merged.setdefault(tuple(row[f] for f in fields), {})[r["triton"]] = row
    header = (
        "| kernel | dtype | status | block NxVxK | warps | stages | arch | "
        + " | ".join(f"regs / spill / smem / CTAs/SM / pipe / mma ({v})" for v in versions)
        + " |"
    )
    lines += ["", header, "|" + "---|" * (7 + len(versions))]
    for k, by_version in merged.items():
        cells = []
        for v in versions:
            row = by_version.get(v)
            if row is None:
                cells.append("n/a")
            elif "error" in row:
                cells.append(f"error: {row['error'][:60]}")
            else:
                spill = f"{row['spill_stores']}/{row['spill_loads']}"
                spill = f"**{spill}**" if row["spill_stores"] or row["spill_loads"] else spill
                fits = "" if row["fits_shared"] else " (too much smem)"
                cells.append(
                    f"{row['registers']} / {spill} / {row['shared_bytes'] / 1024:.0f}{fits} / "
                    f"{row['ctas_per_sm']} / {'yes' if row['pipelined'] else 'no'}{' TMA' if row['tma'] else ''} / "
                    f"{'wgmma' if row['wgmma'] else 'mma'}"
                )
        lines.append("| " + " | ".join(str(x) for x in k) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="one config per kernel (a smoke run)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: all")
    args = parser.parse_args(argv)
    path = run(args.arch, args.out, args.quick, args.dtypes)
    (args.out / "compile_report.md").write_text(markdown(args.out))
    print(f"wrote {path} and {args.out / 'compile_report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
