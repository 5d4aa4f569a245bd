"""What every generation backend shares: the :class:`GenerationBackend` protocol, its result
(:class:`Generation`) and the per-example seeds.

Seeds: the caller gives every batch a seed and every example its own 62-bit seed, hashed from
the run's seed and the example id (:func:`prompt_seed`). Backends that seed each request (vLLM,
servers) seed sample ``j`` of an example with ``prompt_seed + j``, which is what vLLM does itself
for a request with ``n`` samples. Hashed seeds keep the seed ranges of different examples apart:
with consecutive seeds (``seed + index``) example ``i + 1``'s samples would be example ``i``'s
shifted by one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

#: Seeds are drawn below 2**62 so that ``seed + sample_index`` stays a valid 64-bit signed seed
#: (vLLM's server takes seeds up to 2**63 - 1).
SEED_BITS = 62


@dataclass
class Generation:
    """What a backend returns for a batch.

    ``texts[i]`` holds the sampled responses to prompt ``i``. ``prompt_tokens`` counts each
    prompt's tokens once; ``generated_tokens`` counts the tokens of all responses (up to and
    including the end-of-sequence token). ``cached_prompt_tokens`` counts the prompt tokens that
    the engine served from its prefix cache instead of computing them (summed over every
    sample's copy of the prompt), where the backend reports it, else ``None``.
    ``truncated[i][j]`` is true when sample ``j`` of prompt ``i`` was cut by ``max_new_tokens``
    (it ended without an end-of-sequence token); ``None`` when the backend cannot tell.
    """

    texts: list[list[str]]
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int | None = None
    truncated: list[list[bool]] | None = None


def prompt_seed(seed: int, example_id: str) -> int:
    """The seed of one example's samples: a 62-bit hash of the run's ``seed`` and ``example_id``.

    Sample ``j`` is seeded with ``prompt_seed(...) + j``. The hash spreads examples over
    ``2**62`` seeds, so two examples' ranges of ``n`` seeds overlap with probability about
    ``2 * n / 2**62`` (for a million examples of 32 samples, about 1e-5 that any pair does).
    Keyed by the id, not the position, so an example's seeds do not depend on the batch size.
    """
    return random.Random(f"{seed}/{example_id}").getrandbits(SEED_BITS)


class GenerationBackend(Protocol):
    """Samples ``num_samples`` responses per prompt (given as token ids).

    ``seed`` seeds the whole call (for backends that draw every sample from one generator);
    ``prompt_seeds[i]`` seeds prompt ``i`` (for backends that seed each request): sample ``j``
    of prompt ``i`` is drawn with seed ``prompt_seeds[i] + j``. The same seeds give the same
    output.
    """

    name: str

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        prompt_seeds: Sequence[int],
    ) -> Generation:
        """Return :class:`Generation` for ``prompt_ids``."""
        ...


def check_prompt_seeds(prompt_ids: Sequence[Any], prompt_seeds: Sequence[int]) -> None:
    if len(prompt_seeds) != len(prompt_ids):
        raise ValueError(
            f"prompt_seeds: need one seed per prompt, got {len(prompt_seeds)} for "
            f"{len(prompt_ids)} prompts"
        )
