"""Accuracy with its standard error, and paired comparisons between arms, question by question.

Every arm answers the same test questions with each of its seeds. For one arm and one context
length, question ``q`` gets ``c_q``, the fraction of seeds that answer it correctly; the arm's
accuracy is the mean of ``c_q`` and its standard error is ``sd(c_q) / sqrt(Q)`` over the ``Q``
questions: the uncertainty of a new draw of questions, which is what a user's own questions are
(the seeds are averaged inside each question).

Two arms A and B are compared on the same questions through ``d_q = c_q(A) - c_q(B)``: the
difference is the mean of ``d_q``, and a paired bootstrap over questions (resampling whole
questions, with all their lengths when lengths are pooled) gives its 95% interval and a two-sided
p-value. ``mde`` is the smallest difference this design would detect with 80% power at the 5%
level, ``(1.96 + 0.84) * se``, with ``se`` the standard error of the mean of ``d_q``.
Alongside, McNemar's exact test per seed (seed ``s`` of A against seed ``s`` of B) and how many
seeds A is ahead in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from solopo_kernels.data.evaluate import mcnemar_p

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: z for a two-sided 5% test plus z for 80% power.
DETECTABLE_Z = 1.96 + 0.8416


def per_question(correct_by_seed: Sequence[str]) -> np.ndarray:
    """``c_q``: per question, the fraction of seeds right (``correct_by_seed``: one ``0``/``1``
    string per seed, the same question order)."""
    if len({len(s) for s in correct_by_seed}) != 1:
        raise ValueError("correct_by_seed: every seed must answer the same questions")
    matrix = np.array([[c == "1" for c in s] for s in correct_by_seed], dtype=float)
    return matrix.mean(axis=0)


def accuracy(correct_by_seed: Sequence[str]) -> dict[str, float]:
    """Mean accuracy (fraction), its standard error over questions, the seed standard deviation
    of the per-seed accuracies, and the counts."""
    c = per_question(correct_by_seed)
    per_seed = [s.count("1") / len(s) for s in correct_by_seed]
    return {
        "mean": float(c.mean()),
        "se": float(c.std(ddof=1) / math.sqrt(len(c))) if len(c) > 1 else 0.0,
        "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
        "questions": len(c),
        "seeds": len(correct_by_seed),
    }


def paired(
    first: Mapping[str, Sequence[str]],
    second: Mapping[str, Sequence[str]],
    lengths: Sequence[str],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Compare arm ``first`` with arm ``second`` on ``lengths`` pooled (one length: that length).

    ``first[length]`` holds one correctness string per seed. Seeds are paired by position for
    the per-seed McNemar tests (both arms need the same seeds); the bootstrap works on the
    seed-averaged ``d_q`` of every question, the lengths of one question resampled together.
    Returns ``difference`` (fraction), ``ci95``, ``p_bootstrap``, ``se``, ``mde``,
    ``seeds_ahead`` and per seed ``mcnemar`` (``only_first``, ``only_second``, ``p``).
    """
    d = np.stack([per_question(first[n]) - per_question(second[n]) for n in lengths], axis=1)
    per_q = d.mean(axis=1)  # one value per question: its lengths averaged
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_q), size=(samples, len(per_q)))
    boot = per_q[picks].mean(axis=1)
    difference = float(per_q.mean())
    se = float(per_q.std(ddof=1) / math.sqrt(len(per_q)))
    # two-sided: twice the share of resampled differences on the far side of zero
    far = (boot <= 0).mean() if difference > 0 else (boot >= 0).mean()
    seeds = min(len(first[lengths[0]]), len(second[lengths[0]]))
    tests = []
    for s in range(seeds):
        a = "".join(first[n][s] for n in lengths)
        b = "".join(second[n][s] for n in lengths)
        only_first = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
        only_second = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
        tests.append(
            {
                "only_first": only_first,
                "only_second": only_second,
                "p": mcnemar_p(only_first, only_second),
            }
        )
    return {
        "lengths": list(lengths),
        "questions": len(per_q),
        "difference": difference,
        "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "p_bootstrap": float(min(1.0, 2 * far)) if difference != 0 else 1.0,
        "se": se,
        "mde": DETECTABLE_Z * se,
        "seeds_ahead": sum(t["only_first"] > t["only_second"] for t in tests),
        "seeds": seeds,
        "mcnemar": tests,
    }
