"""Judging: normalisation, aliases, numbers, final-answer extraction, sub-EM and the stricter
final-span judge (and the command line's --judge)."""

from __future__ import annotations

import pytest

from solopo_kernels.data.cli import main
from solopo_kernels.data.judge import (
    extract_final_answer,
    final_span_match,
    load_judge,
    make_final_span_judge,
    make_sub_em_judge,
    normalize_answer,
    sub_exact_match,
)

from .conftest import read_jsonl


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
    with pytest.raises(ValueError, match="sub-em or final-span or 'module:function'"):
        load_judge("no_colon")
    with pytest.raises(ValueError, match="not a callable"):
        load_judge("solopo_kernels.data.judge:DEFAULT_ANSWER_MARKER")


@pytest.mark.parametrize(
    "response, answers, expected",
    [
        ("So it is Paris.", ["Paris"], True),
        ("The answer is the Netherlands.", ["Netherlands"], True),  # article and final stop
        ("Paris or Lyon", ["Paris"], False),  # the answer, but not as the final words
        ("Holland, in Europe", ["the Netherlands", "Holland"], False),
        ("in Europe: Holland", ["the Netherlands", "Holland"], True),  # an alias is enough
        ("in 1934", ["34"], False),  # whole words, as for sub-EM
        ("Stratford-upon-Avon!", ["Stratford-upon-Avon"], True),
        ("anything", [""], False),
    ],
)
def test_final_span_match(response, answers, expected):
    assert final_span_match(response, answers) is expected


def test_final_span_judge_rejects_word_salad_that_sub_em_accepts():
    # What a random model samples: words of the vocabulary, the answer among them by chance.
    salad = "river Warsaw bridge the of Poland castle king"
    assert make_sub_em_judge()(salad, ["Poland"]) is True
    assert make_final_span_judge()(salad, ["Poland"]) is False
    assert make_final_span_judge()("Warsaw is in Poland. The answer is Poland.", ["Poland"])
    # The marker applies first, as for sub-EM: the reasoning before it is not read.
    assert make_final_span_judge()("Poland. The answer is Warsaw.", ["Poland"]) is False
    assert load_judge("final-span")(salad, ["Poland"]) is False
    assert load_judge("sub-em")(salad, ["Poland"]) is True
    assert load_judge("sub-em", "")("x answer is y Poland z", ["Poland"]) is True


def test_cli_judge_final_span_is_used_and_recorded(tmp_path, sample_path, capsys):
    contexts, pairs = tmp_path / "contexts.jsonl", tmp_path / "pairs.jsonl"
    build = ["build-contexts", "--input", str(sample_path), "--output", str(contexts)]
    build += ["--tokenizer", "tiny", "--target-lengths", "512", "--limit", "3", "--quiet"]
    assert main(build) == 0
    sample = ["sample-pairs", "--input", str(contexts), "--output", str(pairs), "--model", "tiny"]
    sample += ["--tokenizer", "tiny", "--num-samples", "2", "--max-new-tokens", "4"]
    sample += ["--include-gold", "--quiet", "--judge", "final-span"]
    assert main(sample) == 0
    capsys.readouterr()
    settings = (tmp_path / "pairs.jsonl.progress").read_text().splitlines()[0]
    assert "final-span after 'answer is'" in settings
    # Every chosen response ends with its gold answer ("The answer is <gold>." when offered).
    judge = make_final_span_judge()
    for row in read_jsonl(pairs):
        [chosen] = row["chosen"]
        assert judge(chosen["content"], row["metadata"]["answers"]), row
