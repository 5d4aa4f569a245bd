"""A small replication of SoLoPO's short-to-long transfer, end to end on the CPU.

A procedural multi-hop QA task (invented people; one- and two-hop questions; the evidence buried
among biographies of other people in the long contexts), a tiny Llama fine-tuned on short
prompts and then on long contexts until it passes a dev gate at the longest training length,
preference pairs from ``solopo-data build-contexts`` and ``solopo-data sample-pairs``
(temperature 0.85, sub-EM judge, no gold answer), and for X in DPO, SimPO, ORPO four arms
trained with ``SoLoPOTrainer`` on the same pairs for the same number of steps: X on the short
prompts, X with the pairs placed in the long prompts ("X expand-long"), SoLo-X, and SoLo-X with
``ra_gradient="long"``; alpha chosen on dev. Greedy decoding and the sub-EM judge on test
questions at the short prompt and at long lengths up to twice the longest training length. What
it is, what it shows, and which commit produced the committed results: docs/replication.md.

    python examples/replicate_solopo.py                   # the full preset
    python examples/replicate_solopo.py --max-minutes 15  # the same, in pieces: rerun to go on
    python examples/replicate_solopo.py --quick --work-dir /tmp/q --results /tmp/q/results

Every step and every arm x seed writes its own file; a rerun skips what is finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Nothing here comes from a hub; say so before transformers/datasets are imported.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from replication.config import PRESETS  # noqa: E402
from replication.grid import run_grid  # noqa: E402
from replication.pipeline import Workspace, prepare  # noqa: E402
from replication.report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (toy sizes)")
    parser.add_argument(
        "--work-dir", type=Path, help="generated data and models (default: runs/replication/PRESET)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="unit results, table, plot (default: examples/results/replication for full, "
        "runs/replication/PRESET/results otherwise)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the units")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (the CPU is shared)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="start no new unit after this many minutes; rerun the same command to go on",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    work_dir = args.work_dir or ROOT / "runs" / "replication" / preset.name
    default_results = ROOT / "examples" / "results" / "replication"
    results = args.results or (default_results if preset.name == "full" else work_dir / "results")
    work = Workspace(work_dir, results)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    prepared = prepare(preset, work)
    done = run_grid(
        preset, work, jobs=args.jobs, threads=args.threads, max_minutes=args.max_minutes
    )
    minutes = (time.monotonic() - began) / 60
    if not done:
        print(f"stopped after {minutes:.1f} min with units left; rerun the same command to go on")
        return 3
    write_report(preset, work, prepared, {"minutes_this_run": minutes, "jobs": args.jobs})
    print(f"done in {minutes:.1f} min: {results / 'replication.md'}")
    print((results / "replication.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
