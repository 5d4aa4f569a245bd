"""Shared fixtures of the integration tests: a tiny word-level tokenizer and Llama, four fixed
short/long preference rows, a SoLoPOConfig for the CPU, and the float64 full-logits reference."""

from __future__ import annotations

import copy
from typing import Any

import torch

from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer
from tests import reference

WORDS = (
    "the a key box mat bag cup is in on under where red blue green old cat dog sat ran "
    "park far away note says kitchen garden shelf door answer"
).split()

# (short prompt, long prompt, chosen, rejected): the long prompt is the short one with distractor
# sentences around the relevant one and the same question at the end.
ROWS = [
    (
        "the red key is in the box . where is the red key ?",
        "the dog ran far away . the red key is in the box . the old cat sat on the mat . where is the red key ?",
        " in the box",
        " on the mat",
    ),
    (
        "the blue cup is on the shelf . where is the blue cup ?",
        "a note says the green bag is under the door . the blue cup is on the shelf . where is the blue cup ?",
        " on the shelf",
        " in the garden under the old door",
    ),
    (
        "the old cat sat in the kitchen . where is the old cat ?",
        "the red key is in the box . the dog ran in the park . the old cat sat in the kitchen . the blue cup is on the shelf . where is the old cat ?",
        " in the kitchen",
        " in the park",
    ),
    (
        "the green bag is under the door . where is the green bag ?",
        "the old cat sat on the mat . the green bag is under the door . a note says the dog ran far away . where is the green bag ?",
        " under the door",
        " in the box on the shelf",
    ),
]


def tokenizer() -> Any:
    return tiny_tokenizer(WORDS)


def model_pair(tok: Any, *, seed: int = 0) -> tuple[Any, Any]:
    """A tiny policy and a reference that differs from it (so dpo rewards are not all zero)."""
    policy = tiny_llama(tok, seed=seed)
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, ref


def dataset(rows: list[tuple[str, str, str, str]] = ROWS, **extra_columns: list[Any]) -> Any:
    from datasets import Dataset

    data = {
        "prompt": [r[0] for r in rows],
        "long_prompt": [r[1] for r in rows],
        "chosen": [r[2] for r in rows],
        "rejected": [r[3] for r in rows],
    }
    data.update(extra_columns)
    return Dataset.from_dict(data)


def config(tmp_path: Any, **overrides: Any) -> Any:
    from solopo_kernels.integrations.trl import SoLoPOConfig

    options: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        beta=0.5,
        gradient_checkpointing=False,
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    options.update(overrides)
    return SoLoPOConfig(**options)


def trainer(
    tmp_path: Any,
    *,
    tok: Any = None,
    policy: Any = None,
    ref: Any = None,
    data: Any = None,
    **overrides: Any,
) -> Any:
    from solopo_kernels.integrations.trl import SoLoPOTrainer

    tok = tok or tokenizer()
    if policy is None:
        policy, ref = model_pair(tok)
    return SoLoPOTrainer(
        model=policy,
        ref_model=ref,
        args=config(tmp_path, **overrides),
        train_dataset=data if data is not None else dataset(),
        processing_class=tok,
    )


def batch(trainer_: Any, indices: list[int]) -> dict[str, torch.Tensor]:
    return trainer_.data_collator([trainer_.train_dataset[i] for i in indices])


# ---------------------------------------------------------------------------- float64 reference
def _row_logps(model64: Any, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of float64 log p(ids[t] | ids[:t]) for t >= start, from the full logits of one
    unpadded row, and the count of those positions."""
    x = torch.tensor([ids])
    logits = model64(input_ids=x, use_cache=False).logits[0, :-1]
    tok_logps = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return tok_logps[start - 1 :].sum(), torch.tensor(float(len(ids) - start), dtype=torch.float64)


def _text_rows(tok: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt+response+EOS written out independently of the trainer, and the
    position where the response starts."""
    ids = tok(text=prompt + response + tok.eos_token)["input_ids"]
    start = len(tok(text=prompt)["input_ids"])
    return ids, start


def reference_loss(
    policy64: Any, ref64: Any, tok: Any, rows: list[tuple[str, str, str, str]], **loss_options: Any
) -> torch.Tensor:
    """The objective by hand (``tests.reference.solopo_objective``) on float64 full-logit log-probs of
    the policy (differentiable) and the reference model (``ref64=None``: reference-free)."""
    both = loss_options.get("ra_target", "chosen") == "both"
    short = [_text_rows(tok, r[0], r[2]) for r in rows] + [
        _text_rows(tok, r[0], r[3]) for r in rows
    ]
    long = [_text_rows(tok, r[1], r[2]) for r in rows]
    if both:
        long += [_text_rows(tok, r[1], r[3]) for r in rows]

    def sums(model: Any, seqs: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [_row_logps(model, ids, start) for ids, start in seqs]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    short_logps, short_lengths = sums(policy64, short)
    long_logps, long_lengths = sums(policy64, long)
    refs = {}
    if ref64 is not None:
        with torch.no_grad():
            refs = {
                "ref_short_logps": sums(ref64, short)[0],
                "ref_long_logps": sums(ref64, long)[0],
            }
    loss, _, _ = reference.solopo_objective(
        short_logps, short_lengths, long_logps, long_lengths, **refs, **loss_options
    )
    return loss
