"""Answer normalisation and the sub-exact-match (sub-EM) judge.

A response is judged correct when, after normalisation, one of the gold answers (the answer or
one of its aliases) appears in it as a whole-word span. This is the sub-EM of the paper's recipe
(as in the SoLoPO paper's data pipeline), made stricter than a raw substring test so that the gold answer ``"3"`` does not match
a response that says ``"1934"``.

Sub-EM looks for the answer anywhere in what it reads, so a response that merely contains the
answer word passes: a randomly initialised model, whose samples are strings of words drawn from
a vocabulary that holds the answers, passes now and then by chance. The stricter
:func:`final_span_match` (``solopo-data sample-pairs --judge final-span``) also asks the answer
to be the response's final words, as in ``"... The answer is Paris."``.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Sequence

#: A judge takes a response and the gold answers and says whether the response is correct.
Judge = Callable[[str, Sequence[str]], bool]

#: The phrase after which the default judge looks for a chain-of-thought's final answer.
DEFAULT_ANSWER_MARKER = "answer is"

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_answer(text: str) -> str:
    """Normalise ``text`` for matching and return it as space-separated tokens.

    Steps: strip accents, lowercase, drop thousands separators (``1,000`` -> ``1000``), turn
    every other punctuation or symbol into a space, drop the articles ``a``/``an``/``the`` and
    spell number words zero to twenty as digits (``two`` -> ``2``).
    """
    decomposed = unicodedata.normalize("NFKD", text)
    text = "".join(char for char in decomposed if not unicodedata.combining(char)).lower()
    text = _NON_WORD.sub(" ", _THOUSANDS_SEPARATOR.sub("", text))
    tokens = (_NUMBER_WORDS.get(token, token) for token in text.split())
    return " ".join(token for token in tokens if token not in _ARTICLES)


def sub_exact_match(response: str, answers: Sequence[str]) -> bool:
    """Return whether a normalised gold answer occurs in the normalised ``response``.

    ``answers`` holds the answer and its aliases; any one of them matching is enough. Matching
    is on whole tokens, and an answer that normalises to nothing never matches.
    """
    padded = f" {normalize_answer(response)} "
    return any((gold := normalize_answer(answer)) and f" {gold} " in padded for answer in answers)


def final_span_match(response: str, answers: Sequence[str]) -> bool:
    """Return whether the normalised ``response`` ends with a normalised gold answer.

    Stricter than :func:`sub_exact_match`: ``"Paris"`` matches ``"... so it is Paris."`` but not
    ``"Paris or Lyon"``. Normalisation (:func:`normalize_answer`) drops the final punctuation and
    articles, so ``"the Netherlands."`` ends with ``"Netherlands"``.
    """
    padded = f" {normalize_answer(response)}"
    return any(
        (gold := normalize_answer(answer)) and padded.endswith(f" {gold}") for answer in answers
    )


def extract_final_answer(response: str, marker: str | None = DEFAULT_ANSWER_MARKER) -> str:
    """Return the text after the last (case-insensitive) ``marker`` in ``response``.

    Chain-of-thought responses mention intermediate entities before their final answer; judging
    only what follows ``"... the answer is"`` keeps a wrong final answer from passing because the
    gold answer appeared in the reasoning. Without the marker (or with ``marker`` empty or None)
    the whole response is returned.
    """
    if not marker:
        return response
    position = response.lower().rfind(marker.lower())
    return response if position < 0 else response[position + len(marker) :]


def make_sub_em_judge(marker: str | None = DEFAULT_ANSWER_MARKER) -> Judge:
    """Return the default judge: :func:`sub_exact_match` on :func:`extract_final_answer`."""

    def judge(response: str, answers: Sequence[str]) -> bool:
        return sub_exact_match(extract_final_answer(response, marker), answers)

    return judge


def make_final_span_judge(marker: str | None = DEFAULT_ANSWER_MARKER) -> Judge:
    """Return the strict judge: :func:`final_span_match` on :func:`extract_final_answer`."""

    def judge(response: str, answers: Sequence[str]) -> bool:
        return final_span_match(extract_final_answer(response, marker), answers)

    return judge


#: Judges known by name (``--judge NAME``), each built with the answer marker.
BUILTIN_JUDGES: dict[str, Callable[[str | None], Judge]] = {
    "sub-em": make_sub_em_judge,
    "final-span": make_final_span_judge,
}


def load_judge(spec: str, marker: str | None = DEFAULT_ANSWER_MARKER) -> Judge:
    """Return the judge named ``spec``: a name of :data:`BUILTIN_JUDGES` (built with ``marker``)
    or a user judge imported from ``"package.module:function"``.

    A user function is called as ``function(response: str, answers: list[str]) -> bool``.
    """
    if spec in BUILTIN_JUDGES:
        return BUILTIN_JUDGES[spec](marker)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"judge: expected {' or '.join(BUILTIN_JUDGES)} or 'module:function', got {spec!r}"
        )
    judge = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(judge):
        raise ValueError(f"judge: {spec!r} is not a callable in module {module_name!r}")
    return judge
