"""Sub-exact-match judging: normalisation, aliases, numbers, final-answer extraction."""

from __future__ import annotations

import pytest

from solopo_kernels.data.judge import (
    extract_final_answer,
    load_judge,
    make_sub_em_judge,
    normalize_answer,
    sub_exact_match,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Netherlands", "netherlands"),
        ("Stratford-upon-Avon!", "stratford upon avon"),
        ("Alcalá de Henares", "alcala de henares"),
        ("1,000,000 people", "1000000 people"),
        ("3.5 km", "3 5 km"),
        ("Two moons", "2 moons"),
        ("  an   apple, a pear  ", "apple pear"),
        ("AT&T", "at t"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "response, answers, expected",
    [
        # articles and case
        ("He was born in the Netherlands.", ["Netherlands"], True),
        ("NETHERLANDS", ["the Netherlands"], True),
        # punctuation
        ("stratford upon avon", ["Stratford-upon-Avon"], True),
        ("Born in Stratford-upon-Avon, Warwickshire.", ["Stratford-upon-Avon"], True),
        # aliases
        ("Holland, in Europe", ["the Netherlands", "Netherlands", "Holland"], True),
        ("Belgium", ["the Netherlands", "Holland"], False),
        # accents
        ("The capital is Brasilia.", ["Brasília"], True),
        # numbers: words, separators, and no match inside a longer number
        ("Mars has two moons", ["2"], True),
        ("It has 2 moons", ["two"], True),
        ("about 1,000 soldiers", ["1000"], True),
        ("It happened in 1934.", ["3"], False),
        ("in 1775", ["1775"], True),
        ("in 17750 BC", ["1775"], False),
        # whole words only
        ("Solar power", ["sol"], False),
        ("the sol", ["sol"], True),
        # empty answers never match
        ("anything", ["", "  "], False),
        ("", ["Paris"], False),
    ],
)
def test_sub_exact_match(response, answers, expected):
    assert sub_exact_match(response, answers) is expected


def test_final_answer_extraction():
    cot = "Curie was born in Warsaw, the capital of Poland. So the answer is Poland."
    assert extract_final_answer(cot) == " Poland."
    assert extract_final_answer("No marker here: Warsaw") == "No marker here: Warsaw"
    assert extract_final_answer("The ANSWER IS x; the answer is y", "answer is") == " y"
    assert extract_final_answer("answer is x", None) == "answer is x"

    judge = make_sub_em_judge()
    wrong_final = "Warsaw is in Poland, so the answer is Warsaw."
    assert judge(wrong_final, ["Poland"]) is False  # the gold answer only in the reasoning
    assert make_sub_em_judge("")(wrong_final, ["Poland"]) is True  # whole-response judging
    assert judge("Poland", ["Poland"]) is True  # no marker: the whole response


def test_load_judge():
    assert load_judge("solopo_kernels.data.judge:sub_exact_match") is sub_exact_match
    with pytest.raises(ValueError, match="module:function"):
        load_judge("no_colon")
    with pytest.raises(ValueError, match="not a callable"):
        load_judge("solopo_kernels.data.judge:DEFAULT_ANSWER_MARKER")
