"""What ``nll_average`` changes for orpo and cpo, measured on a real model.

The NLL term of ORPO and CPO on the chosen responses can be averaged per sequence (each response's
token mean, then the mean over pairs: the ORPO paper's formula and this package's default) or over all
chosen response tokens of the batch (TRL's CPOTrainer and ORPOTrainer, a cross-entropy mean; TRL's
ORPOTrainer also counts the prompt tokens). This script takes one batch of 8 chat-format pairs whose
chosen answers run from a few tokens to a few sentences and prints, for orpo and cpo, the loss and
the NLL term under each average, and how far the gradient moves (relative norm of the difference,
and the cosine between the two gradients over all parameters); and TRL's ORPO NLL with the prompt
tokens, for comparison. Values only (no timings); SmolLM2-135M-Instruct in float32, offline.

    python examples/nll_average_effect.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from solopo_kernels import SoLoPOOptions, solopo_loss  # noqa: E402
from solopo_kernels.integrations.model_patch import IGNORE_INDEX, patch_solopo_forward  # noqa: E402
from solopo_kernels.pretrained import load_smollm2  # noqa: E402

FACTS = [
    ("Marie Dubois", "Lyon", "a bakery", "Paris"),
    ("Jonas Berg", "Bergen", "an airline", "Oslo"),
    ("Lena Park", "Busan", "a shipping company", "Seoul"),
    ("Tomas Ruiz", "Seville", "a bank", "Madrid"),
    ("Aiko Tanaka", "Sendai", "a museum", "Kyoto"),
    ("Omar Haddad", "Tunis", "a newspaper", "Lyon"),
    ("Ingrid Olsen", "Aarhus", "a brewery", "Copenhagen"),
    ("Paulo Costa", "Porto", "a hospital", "Lisbon"),
]


def pairs() -> list[tuple[str, str, str]]:
    """(question with its passage, chosen, rejected): chosen answers of growing length."""
    rows = []
    for i, (name, born, employer, city) in enumerate(FACTS):
        passage = f"{name} was born in {born}. {name.split()[0]} works for {employer} in {city}."
        question = f"{passage}\n\nWhere was {name} born?"
        chosen = (
            f"{born}."
            if i % 2 == 0
            else (
                f"According to the passage, {name} was born in {born}, and now works for {employer} "
                f"in {city}, which is not where {name.split()[0]} was born."
            )
        )
        rejected = f"{city}."
        rows.append((question, chosen, rejected))
    return rows


def batch(tokenizer, rows, side: int, *, with_prompt: bool = False):
    """Right-padded ids and labels of prompt + response ``side`` (1 chosen, 2 rejected)."""
    seqs, labels = [], []
    for row in rows:
        prompt = [{"role": "user", "content": row[0]}]
        full = prompt + [{"role": "assistant", "content": row[side]}]
        p_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        f_ids = tokenizer.apply_chat_template(full, tokenize=True)
        p_ids = list(p_ids["input_ids"] if hasattr(p_ids, "keys") else p_ids)
        f_ids = list(f_ids["input_ids"] if hasattr(f_ids, "keys") else f_ids)
        seqs.append(f_ids)
        start = 1 if with_prompt else len(p_ids)
        labels.append([IGNORE_INDEX] * start + f_ids[start:])
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [IGNORE_INDEX] * (width - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask, lab


def main() -> None:
    model, tokenizer = load_smollm2()
    model.train()
    patch_solopo_forward(model)
    rows = pairs()
    chosen, rejected = batch(tokenizer, rows, 1), batch(tokenizer, rows, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    print("| loss type | average | loss | nll term | |g - g_seq| / |g_seq| | cos(g, g_seq) |")
    print("|---|---|---|---|---|---|")
    lengths_seen = None
    for loss_type in ("orpo", "cpo"):
        grads = {}
        for average in ("sequence", "token"):
            model.zero_grad()
            outs = [
                model(input_ids=i, attention_mask=m, solopo_labels=lab)
                for i, m, lab in (chosen, rejected)
            ]
            logps = torch.cat([o.logps for o in outs])
            lengths = torch.cat([o.lengths for o in outs])
            lengths_seen = lengths[: len(rows)].tolist()
            options = SoLoPOOptions(loss_type=loss_type, beta=0.1, alpha=0.0, nll_average=average)
            out = solopo_loss(logps, lengths, None, None, options=options)
            out.loss.backward()
            grads[average] = torch.cat([p.grad.flatten() for p in params]).double()
            g, g_seq = grads[average], grads["sequence"]
            moved = ((g - g_seq).norm() / g_seq.norm()).item()
            cosine = torch.nn.functional.cosine_similarity(g, g_seq, dim=0).item()
            print(
                f"| {loss_type} | {average} | {out.loss.item():.4f} | "
                f"{out.metrics['nll_loss'].item():.4f} | {moved:.3f} | {cosine:.4f} |"
            )
    with torch.no_grad():
        ids, mask, lab = batch(tokenizer, rows, 1, with_prompt=True)
        out = model(input_ids=ids, attention_mask=mask, solopo_labels=lab)
        trl_orpo = (-out.logps.sum() / out.lengths.sum()).item()
    print(f"\nchosen response tokens: {lengths_seen}")
    print(f"TRL ORPOTrainer's NLL (prompt and response tokens of the chosen rows): {trl_orpo:.4f}")


if __name__ == "__main__":
    main()
