"""Presets of the replication: every size, step count, length and seed in one frozen object.

``full`` is the committed experiment; ``quick`` runs the same code on toy sizes in about a
minute (a plumbing check, used by the test suite: its numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

#: The three preference losses of the paper, in table order.
LOSS_TYPES = ("dpo", "simpo", "orpo")
#: The arms of each loss type: (name, where the preference loss reads its prompt, SoLo-RA on).
VARIANTS = ("short", "expand-long", "solo")
#: SoLo-RA weights from the paper (Qwen2.5-7B): 3 for SoLo-DPO, 1 for SoLo-SimPO and SoLo-ORPO.
PAPER_ALPHA = {"dpo": 3.0, "simpo": 1.0, "orpo": 1.0}


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama of :func:`solopo_kernels.tiny_models.tiny_llama`."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning of the starting model on short prompts.

    Next-token loss on the whole chat-formatted sequence (short prompt and reference answer):
    the model learns the passage style and the answer format at once. Fresh questions every
    batch, so it cannot memorise answers. ``max_distractors`` > 0 mixes 0 to that many other
    people's biographies into each prompt (uniformly); the committed run uses none (see
    docs/replication.md for what that changed on the dev set). Training stops at the first check where greedy
    accuracy on ``check_questions`` dev short prompts reaches ``target_accuracy`` (a fair share,
    not all), or after ``max_steps``.
    """

    batch_size: int = 32
    learning_rate: float = 3e-3
    max_steps: int = 2400
    check_every: int = 200
    check_questions: int = 100
    target_accuracy: float = 0.5
    max_distractors: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    """One experiment size. ``sweep`` maps a loss type to the hyperparameter settings tried on
    the dev set (each a dict of ``beta``, for SimPO ``gamma``, and optionally ``lr``, which
    replaces ``learning_rate``); every arm gets the setting with its best mean dev accuracy."""

    name: str
    train_questions: int
    dev_questions: int
    test_questions: int
    model: ModelShape
    sft: SFTConfig
    #: ``solopo-data build-contexts --target-lengths`` of the training pairs (multi-scale).
    train_lengths: tuple[int, ...]
    #: Long-context lengths of the evaluation (the short prompt is always evaluated too).
    eval_lengths: tuple[int, ...]
    num_samples: int = 8
    temperature: float = 0.85
    max_new_tokens: int = 32
    #: Only for presets whose starting model cannot answer (``quick``): offer the gold answer.
    include_gold: bool = False
    steps: int = 64
    batch_size: int = 8
    learning_rate: float = 5e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep: dict[str, tuple[dict[str, float], ...]] = field(default_factory=dict)
    eval_batch_size: int = 32
    data_seed: int = 0

    def fingerprint(self) -> str:
        """A short hash of everything that shapes the data and the starting model."""
        keys = (
            "train_questions",
            "dev_questions",
            "test_questions",
            "model",
            "sft",
            "train_lengths",
            "eval_lengths",
            "num_samples",
            "temperature",
            "max_new_tokens",
            "include_gold",
            "data_seed",
        )
        described = {key: _plain(getattr(self, key)) for key in keys}
        return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:10]


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


FULL = Preset(
    name="full",
    train_questions=500,
    dev_questions=100,
    test_questions=200,
    model=ModelShape(),
    sft=SFTConfig(),
    train_lengths=(256, 512),
    eval_lengths=(256, 512, 1024),
    # Two reward scales at the default learning rate, then the same at a lower one ("lr").
    sweep={
        "dpo": (
            {"beta": 0.1},
            {"beta": 0.5},
            {"beta": 0.1, "lr": 1.5e-4},
            {"beta": 0.5, "lr": 1.5e-4},
        ),
        "simpo": (
            {"beta": 2.0, "gamma": 0.5},
            {"beta": 5.0, "gamma": 1.0},
            {"beta": 2.0, "gamma": 0.5, "lr": 1.5e-4},
            {"beta": 5.0, "gamma": 1.0, "lr": 1.5e-4},
        ),
        "orpo": (
            {"beta": 0.1},
            {"beta": 0.5},
            {"beta": 0.1, "lr": 1.5e-4},
            {"beta": 0.5, "lr": 1.5e-4},
        ),
    },
)

QUICK = Preset(
    name="quick",
    train_questions=16,
    dev_questions=8,
    test_questions=8,
    model=ModelShape(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1),
    sft=SFTConfig(batch_size=8, max_steps=4, check_every=2, check_questions=4),
    train_lengths=(192, 256),
    eval_lengths=(192, 320),
    num_samples=2,
    max_new_tokens=8,
    include_gold=True,
    steps=2,
    batch_size=2,
    seeds=(0, 1),
    sweep={
        "dpo": ({"beta": 0.1}, {"beta": 0.5}),
        "simpo": ({"beta": 2.0, "gamma": 0.5},),
        "orpo": ({"beta": 0.1},),
    },
    eval_batch_size=8,
)

PRESETS = {preset.name: preset for preset in (FULL, QUICK)}
