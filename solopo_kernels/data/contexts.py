"""Short and long contexts: prompt templates, the distractor pool, target lengths, the builder.

The short prompt is ``x_short = [c_rel; I]``: the template's header, the relevant passages and
the question. The long prompt ``x_long = [c_rel, c_irr; I]`` is the same template around the
same passages, unchanged and in the same order, with distractor passages around them up to a
target length measured in tokens of the target model's tokenizer. The text after the passages
(instruction and question) is identical in both, so a response continues either prompt.

Nothing here imports torch: the tokenizer is any ``transformers`` fast tokenizer.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tqdm.auto import tqdm

from .judge import normalize_answer
from .readers import Passage, QAExample

PromptFormat = Literal["standard", "conversational"]
OwnDistractors = Literal["pool", "first"]
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class PromptTemplate:
    """The text around the passages.

    ``header`` comes before the passages, ``footer`` (where ``{question}`` is replaced by the
    question) after them;
    passages are joined by ``separator``. Standard-format prompts end with ``answer_cue``;
    conversational ones end where the chat template starts the assistant's turn.
    """

    name: str
    header: str
    footer: str
    answer_cue: str = "\nAnswer:"
    separator: str = "\n\n"

    def user_text(self, passages: Sequence[str], question: str) -> tuple[str, list[int]]:
        """Return the text around ``passages`` and the character offset of each passage in it."""
        offsets = []
        position = len(self.header) + len(self.separator)
        for passage in passages:
            offsets.append(position)
            position += len(passage) + len(self.separator)
        body = self.separator.join(passages)
        footer = self.footer.replace("{question}", question)
        return f"{self.header}{self.separator}{body}{self.separator}{footer}", offsets


_ANSWER_ONLY = "Only give me the answer and do not output any other words."
TEMPLATES: dict[str, PromptTemplate] = {
    "qa": PromptTemplate(
        name="qa",
        header=f"Answer the question based on the given passages. {_ANSWER_ONLY}\n\n"
        "The following are given passages.",
        footer=f"Answer the question based on the given passages. {_ANSWER_ONLY}\n\n"
        "Question: {question}",
    ),
    "cot": PromptTemplate(
        name="cot",
        header="Answer the question based on the given passages.\n\n"
        "The following are given passages.",
        footer="Answer the question based on the given passages. Think step by step, then end "
        'with "The answer is X." where X is the final answer.\n\nQuestion: {question}',
    ),
}


def prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    """Return the text the model reads for ``prompt``.

    A string prompt is returned as it is; a conversational prompt (a list of messages) is
    rendered with the tokenizer's chat template, ending with the assistant's generation prompt.
    """
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def parse_length(spec: str) -> int:
    """Parse a token count: ``"4096"``, or ``"4k"``/``"4K"`` for 4 * 1024."""
    text = spec.strip().lower()
    scale = 1024 if text.endswith("k") else 1
    try:
        value = int(text.removesuffix("k")) * scale
    except ValueError:
        raise ValueError(f"not a token count: {spec!r} (use e.g. 4096 or 4k)") from None
    if value <= 0:
        raise ValueError(f"token counts must be positive, got {spec!r}")
    return value


@dataclass(frozen=True)
class TargetLengths:
    """Where each example's long-prompt length comes from (multi-scale sampling).

    Either a set of ``choices`` (each example draws one uniformly) or an inclusive range
    ``(low, high)`` (each example draws an integer uniformly).
    """

    choices: tuple[int, ...] = ()
    range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if bool(self.choices) == (self.range is not None):
            raise ValueError("TargetLengths: give either choices or range, not both or neither")
        if self.range is not None and not 0 < self.range[0] <= self.range[1]:
            raise ValueError(f"TargetLengths: range must be 0 < low <= high, got {self.range}")
        if any(choice <= 0 for choice in self.choices):
            raise ValueError(f"TargetLengths: choices must be positive, got {self.choices}")

    @classmethod
    def parse(cls, choices: str | None = None, length_range: str | None = None) -> TargetLengths:
        """Build from ``"4k,8k,16k"`` (choices) or ``"3000:9000"`` (range)."""
        if length_range is not None and choices is None:
            low, sep, high = length_range.partition(":")
            if not sep:
                raise ValueError(f"target range must be LOW:HIGH, got {length_range!r}")
            return cls(range=(parse_length(low), parse_length(high)))
        if choices is None or length_range is not None:
            raise ValueError("give either target lengths or a target range")
        return cls(choices=tuple(parse_length(part) for part in choices.split(",")))

    def draw(self, rng: random.Random) -> int:
        """Draw one target length with ``rng``."""
        if self.range is not None:
            return rng.randint(*self.range)
        return rng.choice(self.choices)


def answer_keys(example: QAExample) -> frozenset[str]:
    """The normalised gold answers of ``example`` (empty normalisations dropped)."""
    return frozenset(key for key in map(normalize_answer, example.answers) if key)


class DistractorPool:
    """Every passage of every example, deduplicated by rendered text and sorted by it.

    Sorting makes the pool, and so each example's distractors, independent of the order of the
    examples. Each passage remembers the answers of the examples it is relevant to. For an
    example, a passage is usable as a distractor unless it is relevant to an example with one of
    the same gold answers (the example's own relevant passages included), contains one of its
    gold answers, or contains one of its relevant passages.
    """

    def __init__(self, examples: Iterable[QAExample]) -> None:
        by_text: dict[str, Passage] = {}
        supports: dict[str, set[str]] = defaultdict(set)
        for example in examples:
            keys = answer_keys(example)
            for passage in (*example.passages, *example.distractors):
                by_text.setdefault(passage.render(), passage)
            for passage in example.passages:
                supports[passage.render()].update(keys)
        texts = sorted(by_text)
        self.passages: list[Passage] = [by_text[text] for text in texts]
        self._index = {text: index for index, text in enumerate(texts)}
        self._supports = [frozenset(supports.get(text, ())) for text in texts]
        self._normalized: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.passages)

    def index_of(self, passage: Passage) -> int:
        """Return the pool index of ``passage`` (which must come from the pool's examples)."""
        return self._index[passage.render()]

    def usable(self, index: int, example: QAExample, keys: frozenset[str]) -> bool:
        """Whether passage ``index`` may be a distractor for ``example`` (``keys``: its answers)."""
        if self._supports[index] & keys:
            return False
        passage = self.passages[index]
        if any(relevant.text in passage.text for relevant in example.passages):
            return False
        if index not in self._normalized:
            self._normalized[index] = f" {normalize_answer(passage.render())} "
        normalized = self._normalized[index]
        return not any(f" {key} " in normalized for key in keys)


def _lazy_permutation(size: int, rng: random.Random) -> Iterator[int]:
    """Yield a uniform random permutation of ``range(size)`` one item at a time (O(1) per item)."""
    moved: dict[int, int] = {}
    for position in range(size):
        pick = rng.randrange(position, size)
        yield moved.get(pick, pick)
        moved[pick] = moved.get(position, position)


@dataclass
class _Layout:
    prompt: Prompt
    length: int
    depths: list[float]
    num_distractors: int


class ContextBuilder:
    """Builds the short and long prompt of each example.

    Args:
        tokenizer: the target model's fast tokenizer; lengths are counted in its tokens on the
            text the model reads (the chat template applied for conversational prompts), without
            extra special tokens.
        pool: where distractors come from (usually :class:`DistractorPool` over all examples).
        template: the text around the passages (see :data:`TEMPLATES`); ``cot`` asks for
            reasoning that ends with "The answer is X.", ``qa`` for the answer only.
        prompt_format: ``"conversational"`` (a list with one user message; needs a tokenizer
            with a chat template) or ``"standard"`` (prompts are strings ending with
            ``template.answer_cue``).
        tolerance: a long prompt of target ``T`` ends up with ``T - max(1, floor(T * tolerance))
            <= length <= T`` tokens. To get there the last distractor may be cut short.
        own_distractors: ``"pool"`` draws every distractor at random from the pool (the paper's
            random distractors); ``"first"`` uses the example's own distractors (MuSiQue's
            non-supporting paragraphs, the generic schema's ``distractors``) first, in random order.
        seed: the seed; an example's output depends only on the seed, its id, its content and
            the pool, not on the other examples' order.
    """

    def __init__(
        self,
        tokenizer: Any,
        pool: DistractorPool,
        *,
        template: PromptTemplate = TEMPLATES["cot"],
        prompt_format: PromptFormat = "conversational",
        tolerance: float = 0.01,
        own_distractors: OwnDistractors = "pool",
        seed: int = 0,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("tokenizer: a fast (Rust) tokenizer is needed for offset mappings")
        if prompt_format not in ("standard", "conversational"):
            raise ValueError(
                f"prompt_format must be standard or conversational, not {prompt_format!r}"
            )
        if prompt_format == "conversational" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "tokenizer: conversational prompts need a tokenizer with a chat_template"
            )
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
        if own_distractors not in ("pool", "first"):
            raise ValueError(f"own_distractors must be pool or first, not {own_distractors!r}")
        self.tokenizer = tokenizer
        self.pool = pool
        self.template = template
        self.prompt_format = prompt_format
        self.tolerance = tolerance
        self.own_distractors = own_distractors
        self.seed = seed
        self._separator_cost = self._count(template.separator)
        self._costs: dict[int, int] = {}

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cost(self, index: int) -> int:
        """Tokens that adding pool passage ``index`` to a context costs (separator included)."""
        if index not in self._costs:
            passage_tokens = self._count(self.pool.passages[index].render())
            self._costs[index] = passage_tokens + self._separator_cost
        return self._costs[index]

    def _prefix(self, index: int, tokens: int) -> str:
        """The first ``tokens`` tokens of pool passage ``index``, as text."""
        text = self.pool.passages[index].render()
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        return text[: offsets[min(tokens, len(offsets)) - 1][1]].rstrip()

    def _layout(
        self, example: QAExample, fillers: Sequence[str], slots: Sequence[float]
    ) -> _Layout:
        """Render ``example`` with ``fillers`` and its passages at fractional ``slots``."""
        relevant = [passage.render() for passage in example.passages]
        positions = [min(int(slot * (len(fillers) + 1)), len(fillers)) for slot in slots]
        items: list[str] = []
        relevant_items: list[int] = []
        for position in range(len(fillers) + 1):
            for rank in (rank for rank, pos in enumerate(positions) if pos == position):
                relevant_items.append(len(items))
                items.append(relevant[rank])
            if position < len(fillers):
                items.append(fillers[position])
        text, offsets = self.template.user_text(items, example.question)
        if self.prompt_format == "standard":
            prompt: Prompt = text + self.template.answer_cue
        else:
            prompt = [{"role": "user", "content": text}]
        rendered = prompt_text(self.tokenizer, prompt)
        base = rendered.find(text)
        if base < 0:
            raise ValueError(
                f"example {example.id!r}: the chat template changed the user message text; "
                "use prompt_format='standard'"
            )
        encoding = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoding["offset_mapping"]]
        length = len(starts)
        depths = [
            round((bisect.bisect_right(starts, base + offsets[item]) - 1) / length, 4)
            for item in relevant_items
        ]
        return _Layout(prompt, length, depths, len(fillers))

    def _candidates(self, example: QAExample, rng: random.Random) -> Iterator[int]:
        """Pool indices of usable distractors for ``example``, in the order they are used."""
        keys = answer_keys(example)
        own: list[int] = []
        if self.own_distractors == "first":
            own = list(dict.fromkeys(map(self.pool.index_of, example.distractors)))
            rng.shuffle(own)
        own_set = set(own)
        rest = (index for index in _lazy_permutation(len(self.pool), rng) if index not in own_set)
        for index in itertools.chain(own, rest):
            if self.pool.usable(index, example, keys):
                yield index

    def build(self, example: QAExample, lengths: TargetLengths) -> dict[str, Any]:
        """Return the row for ``example``: ``id``, ``prompt``, ``long_prompt``, ``answers``, ``metadata``.

        ``metadata`` holds ``question``, ``target_length``, ``short_length``, ``long_length``,
        ``rho`` (short / long length), ``depths`` (where each relevant passage starts, as a
        fraction of the long prompt's tokens, in passage order), ``num_distractors``, ``template``
        and ``format``. Raises ``ValueError`` naming the example when the target is not longer than
        the short prompt or when the pool cannot fill the long prompt.
        """
        rng = random.Random(f"{self.seed}/{example.id}")
        target = lengths.draw(rng)
        slots = sorted(rng.random() for _ in example.passages)
        short = self._layout(example, [], [0.0] * len(example.passages))
        if target <= short.length:
            raise ValueError(
                f"example {example.id!r}: target length {target} tokens is not longer than the "
                f"short prompt ({short.length} tokens)"
            )
        long, exhausted = self._fill(example, target, short.length, slots, rng)
        tolerance_tokens = max(1, math.floor(target * self.tolerance))
        if not target - tolerance_tokens <= long.length <= target:
            if exhausted:
                raise ValueError(
                    f"example {example.id!r}: the distractor pool ran out at {long.length} tokens "
                    f"(target {target}, pool of {len(self.pool)} passages); add examples or "
                    "lower the target length"
                )
            raise ValueError(
                f"example {example.id!r}: could not fit the long prompt in "
                f"[{target - tolerance_tokens}, {target}] tokens (got {long.length}); the steps "
                "between distractor cuts are too coarse for this tolerance, raise it"
            )
        return {
            "id": example.id,
            "prompt": short.prompt,
            "long_prompt": long.prompt,
            "answers": list(example.answers),
            "metadata": {
                "question": example.question,
                "target_length": target,
                "short_length": short.length,
                "long_length": long.length,
                "rho": short.length / long.length,
                "depths": long.depths,
                "num_distractors": long.num_distractors,
                "template": self.template.name,
                "format": self.prompt_format,
            },
        }

    def _fill(
        self,
        example: QAExample,
        target: int,
        short_length: int,
        slots: Sequence[float],
        rng: random.Random,
    ) -> tuple[_Layout, bool]:
        """Add distractors until the long prompt is within tolerance of ``target``.

        First whole passages only (as many as fit); if that falls short of the tolerance band,
        the next passage is cut so as to aim at the middle of the band, and the cut is corrected
        from the measured length (token counts are not exactly additive) a few times.
        Returns the layout and whether the pool ran out.
        """
        tolerance_tokens = max(1, math.floor(target * self.tolerance))
        low, aim = target - tolerance_tokens, target - tolerance_tokens // 2
        stream = self._candidates(example, rng)
        drawn: list[int] = []
        exhausted = False

        def fillers(budget: int, cut: bool) -> list[str]:
            nonlocal exhausted
            texts: list[str] = []
            used = 0
            while True:
                if len(texts) == len(drawn):
                    index = next(stream, None)
                    if index is None:
                        exhausted = True
                        return texts
                    drawn.append(index)
                index = drawn[len(texts)]
                if used + self._cost(index) > budget:
                    room = budget - used - self._separator_cost
                    if cut and room > 0:
                        texts.append(self._prefix(index, room))
                    return texts
                texts.append(self.pool.passages[index].render())
                used += self._cost(index)

        texts = fillers(target - short_length, cut=False)
        if not drawn:
            raise ValueError(
                f"example {example.id!r}: no usable distractor in a pool of {len(self.pool)} "
                "passages (its own relevant passages, passages relevant to the same answer and "
                "passages containing the answer are excluded)"
            )
        result = self._layout(example, texts, slots)
        estimate = short_length + sum(self._cost(index) for index in drawn[: len(texts)])
        budget = aim - short_length - (result.length - estimate)
        for _ in range(8):
            if low <= result.length <= target or (exhausted and result.length < low):
                break
            result = self._layout(example, fillers(budget, cut=True), slots)
            budget += aim - result.length
        return result, exhausted


def build_contexts(
    examples: Sequence[QAExample],
    tokenizer: Any,
    lengths: TargetLengths,
    *,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Build the short/long rows of ``examples`` with a pool over all of them.

    ``options`` are :class:`ContextBuilder`'s keyword arguments. Returns rows in input order.
    """
    builder = ContextBuilder(tokenizer, DistractorPool(examples), **options)
    iterator = tqdm(examples, desc="build-contexts", unit="example", disable=not progress)
    return [builder.build(example, lengths) for example in iterator]


def summarize_lengths(
    rows: Sequence[dict[str, Any]], bins: int | None = None
) -> list[dict[str, Any]]:
    """Summarise the long prompts' lengths per target length (or per ``bins`` equal-width bins).

    Returns one dict per group, in increasing order: ``target`` (the length, or ``"low-high"``
    for a bin), ``count``, ``long_mean``, ``long_min``, ``long_max``, ``short_mean``,
    ``rho_mean``.
    """
    targets = [row["metadata"]["target_length"] for row in rows]
    if bins:
        low, high = min(targets), max(targets)
        width = max(1, math.ceil((high - low + 1) / bins))
        edges = [(low + i * width, min(high, low + (i + 1) * width - 1)) for i in range(bins)]

        def label(target: int) -> tuple[int, int]:
            return edges[(target - low) // width]
    else:

        def label(target: int) -> tuple[int, int]:
            return (target, target)

    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for target, row in zip(targets, rows, strict=True):
        groups[label(target)].append(row["metadata"])
    summary = []
    for (start, end), metas in sorted(groups.items()):
        longs = [meta["long_length"] for meta in metas]
        summary.append(
            {
                "target": start if start == end else f"{start}-{end}",
                "count": len(metas),
                "long_mean": statistics.fmean(longs),
                "long_min": min(longs),
                "long_max": max(longs),
                "short_mean": statistics.fmean(meta["short_length"] for meta in metas),
                "rho_mean": statistics.fmean(meta["rho"] for meta in metas),
            }
        )
    return summary


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """Render :func:`summarize_lengths` output as a fixed-width text table."""
    lines = [
        f"{'target':>13} {'count':>5} {'long mean':>9} {'long min':>8} {'long max':>8} "
        f"{'short mean':>10} {'rho mean':>8}"
    ]
    for group in summary:
        lines.append(
            f"{group['target']!s:>13} {group['count']:>5} {group['long_mean']:>9.1f} "
            f"{group['long_min']:>8} {group['long_max']:>8} {group['short_mean']:>10.1f} "
            f"{group['rho_mean']:>8.3f}"
        )
    return "\n".join(lines)
