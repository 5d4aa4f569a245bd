"""Step times of the SmolLM2 replication's arms, for planning its grid: a few optimizer steps of
each arm on the replication's own pairs (float32 LoRA as the grid trains them), nothing saved.

    python examples/smollm2_step_times.py --work-dir runs/smollm2/full --steps 3
    python examples/smollm2_step_times.py --quick --work-dir /tmp/q   # after a --quick run there

The work directory must hold the pairs (run ``examples/replicate_smollm2.py`` first, or copy the
committed ``examples/results/smollm2_replication/pairs/`` into ``WORK_DIR/pairs/``). Take the
timings on a quiet machine: on a shared one they measure the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from smollm2_replication.config import PRESETS, VARIANTS  # noqa: E402
from smollm2_replication.pipeline import Workspace, model_folder, read_jsonl  # noqa: E402
from smollm2_replication.training import train, unit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--work-dir", type=Path, required=True, help="the replication's work dir")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per arm")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    work = Workspace(args.work_dir, args.work_dir / "unused-results")
    pairs = len(read_jsonl(work.pairs))
    # epochs such that steps_of() gives exactly --steps
    preset = dataclasses.replace(preset, epochs=args.steps * preset.batch_size / pairs)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = model_folder(preset, work)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rate = preset.learning_rates[0]
    for variant in args.variants:
        hparams = {"lr": rate, "alpha": preset.alphas[0]} if "solo" in variant else {"lr": rate}
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        _, cost = train(unit(variant, 0, "dev", hparams), preset, work, model, tokenizer)
        row = {"arm": unit(variant, 0, "dev", hparams).arm, **cost}
        row.pop("log")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
