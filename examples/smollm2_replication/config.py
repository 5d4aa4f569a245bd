"""Presets of the SmolLM2 replication: every size, length, step count and seed in one frozen object.

``full`` is the experiment whose results are committed; ``quick`` runs the same code end to end
on a tiny random Llama with toy sizes in well under a minute (the plumbing check of the test
suite; its numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

#: The arms, all SimPO on the same pairs for the same steps: X on the short prompts, X with the
#: long prompts in their place ("X expand-long"), SoLo-X (the paper's SoLo-RA), and SoLo-X with
#: ``ra_gradient="long"`` (SoLo-RA moves the long side only).
VARIANTS = ("short", "expand-long", "solo", "solo-long")
SOLO_VARIANTS = ("solo", "solo-long")
#: The model the quick preset builds in its work directory instead of loading a pretrained one.
TINY_MODEL = "tiny"


@dataclass(frozen=True)
class Preset:
    """One experiment size.

    Data: ``train_questions`` one-hop biography questions, whose contexts are built at
    ``train_length`` tokens and whose short prompts the model samples ``num_samples`` answers
    for (temperature ``temperature``, sub-EM judge, no gold answer unless ``include_gold``,
    answers cut by ``sample_max_new_tokens`` neither chosen nor rejected unless
    ``keep_truncated``: the quick preset's random model never stops);
    ``dev_questions`` and ``test_questions`` held out, disjoint in people, evaluated at the
    short prompt and at ``dev_lengths`` / ``test_lengths`` tokens; with
    ``test_eval_questions``, only the first that many test questions are answered (the data,
    and so the fingerprint, stay those of ``test_questions``: the cut is the evaluation's).

    Training: LoRA of rank ``lora_rank`` on every linear projection (the tied embedding and head
    stay frozen), ``epochs`` passes over the pairs in steps of ``batch_size`` pairs, SimPO with
    ``beta`` and ``gamma``, in float32, or with bf16 autocast when ``bf16`` (float32 master
    weights; only on a CPU with bf16 matrix units: on an AVX2-only CPU torch's bf16 matmul
    falls back to a scalar loop, 58x slower than float32 in the pilot). The learning
    rate is chosen on dev among ``learning_rates`` for X and for X expand-long; the SoLo arms take
    X's and choose alpha among ``alphas``; then every arm runs with every seed of ``seeds``.
    """

    name: str
    model: str
    train_questions: int
    dev_questions: int
    test_questions: int
    train_length: int
    dev_lengths: tuple[int, ...]
    test_lengths: tuple[int, ...]
    test_eval_questions: int | None = None
    template: str = "qa"
    num_samples: int = 8
    temperature: float = 0.85
    sample_max_new_tokens: int = 32
    sample_batch_size: int = 32
    include_gold: bool = False
    keep_truncated: bool = False
    answer_max_new_tokens: int = 32
    eval_batch_size: int = 8
    lora_rank: int = 16
    bf16: bool = False
    epochs: float = 1.0
    batch_size: int = 4
    beta: float = 2.0
    gamma: float = 0.5
    learning_rates: tuple[float, ...] = (5e-5, 2e-4)
    alphas: tuple[float, ...] = (0.3, 1.0, 3.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0

    def fingerprint(self) -> str:
        """A short hash of everything that shapes the data and the pairs (not the training):
        units trained on other data are redone, not mixed in."""
        keys = (
            "model",
            "train_questions",
            "dev_questions",
            "test_questions",
            "train_length",
            "dev_lengths",
            "test_lengths",
            "template",
            "num_samples",
            "temperature",
            "sample_max_new_tokens",
            "include_gold",
            "answer_max_new_tokens",
            "data_seed",
        )
        described = {key: _plain(getattr(self, key)) for key in keys}
        if self.keep_truncated:  # only when set: the full preset's committed hash stays the same
            described["keep_truncated"] = True
        return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:10]


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


FULL = Preset(
    name="full",
    model="smollm2-135m-instruct",
    # 240 questions: about 220 pairs (92% yield in the pilot), 55 steps of 4 pairs per arm;
    # sized so that the whole grid fits about 4.5 hours of two quiet cores (docs/replication.md)
    train_questions=240,
    dev_questions=100,
    test_questions=200,
    # 120 of the 200 answered: a test unit at short/512/1,024/2,048 costs about 17 min instead
    # of 28 (greedy prefill is compute-bound: ~2.2 s an answer at 1,024 and ~5 s at 2,048 on two
    # cores, vLLM and transformers alike), 13 test units 3.7 h instead of 6
    test_eval_questions=120,
    train_length=512,
    dev_lengths=(512, 1024),
    test_lengths=(512, 1024, 2048),
)

QUICK = Preset(
    name="quick",
    model=TINY_MODEL,
    train_questions=6,
    dev_questions=3,
    test_questions=3,
    train_length=320,
    dev_lengths=(320,),
    test_lengths=(320, 400),
    test_eval_questions=2,  # the cut's plumbing
    num_samples=2,
    sample_max_new_tokens=6,
    include_gold=True,
    keep_truncated=True,
    answer_max_new_tokens=6,
    lora_rank=4,
    batch_size=2,
    learning_rates=(1e-3,),
    alphas=(0.3, 3.0),
    seeds=(0, 1),
)

PRESETS = {preset.name: preset for preset in (FULL, QUICK)}
