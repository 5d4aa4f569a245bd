"""The GPU check: ``python -m solopo_kernels.doctor`` from this checkout, with its results written
under ``--out`` as ``gpu_check.json`` and ``gpu_check.md`` (``benchmarks/gpu_check.sh`` runs it
once per shape, after installing the carried peer wheels, within a time bound).

    python benchmarks/gpu_check.py [--out DIR] [doctor options: --shapes NxHxV ..., --peers ...]

Everything else (the correctness checks against float64, the dispatch report, the timings next to
the peers, the exit status) is the doctor's: see ``solopo_kernels/doctor.py``. Without a GPU,
``python benchmarks/gpu_check.py --device cpu --interpret`` runs the same pipeline at a tiny shape
under the Triton interpreter (timings then mean nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package from this checkout: no install needed
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    known, rest = parser.parse_known_args(argv)
    from solopo_kernels import doctor

    out = known.out
    return doctor.main(
        [*rest, "--json", str(out / "gpu_check.json"), "--markdown", str(out / "gpu_check.md")]
    )


if __name__ == "__main__":
    sys.exit(main())
