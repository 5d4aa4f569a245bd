"""Write what ``solopo_tiny.yaml`` trains on: a tiny Llama with its word-level tokenizer, and a
small short/long fact-lookup preference set (TRL standard format plus ``long_prompt``), both made
in code, offline.

    python examples/axolotl/make_tiny_model.py OUT_DIR     # default: ./solopo-tiny
    # -> OUT_DIR/model (save_pretrained) and OUT_DIR/train.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_tiny_solopo import GLUE, ITEMS, NAMES, PLACES, make_pairs  # noqa: E402

from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

# solopo_tiny.yaml trains 500 steps of 4 pairs: about four epochs of these.
N_PAIRS = 512


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "solopo-tiny")
    tokenizer = tiny_tokenizer(NAMES + ITEMS + PLACES + GLUE)
    model = tiny_llama(tokenizer, hidden_size=64)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    with open(out / "train.jsonl", "w") as f:
        for row in make_pairs(N_PAIRS, distractors=5, rng=random.Random(0)):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out / 'model'} and {out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
