"""Readers: the MuSiQue and generic schemas, and errors that name the example and field."""

from __future__ import annotations

import json

import pytest

from solopo_kernels.data.readers import Passage, read_examples

from .conftest import write_jsonl


def musique_row(example_id="q1", **overrides):
    row = {
        "id": example_id,
        "question": "Where was Ada born?",
        "answer": "London",
        "answer_aliases": ["London, England"],
        "answerable": True,
        "paragraphs": [
            {
                "idx": 0,
                "title": "Filler",
                "paragraph_text": "Cats sleep a lot.",
                "is_supporting": False,
            },
            {
                "idx": 1,
                "title": "Ada",
                "paragraph_text": "Ada was born in London.",
                "is_supporting": True,
            },
            {"idx": 2, "title": "", "paragraph_text": "Ada wrote notes.", "is_supporting": True},
        ],
    }
    row.update(overrides)
    return row


def test_bundled_sample_is_a_valid_musique_file(sample_path, examples):
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    assert 20 <= len(examples) == len(rows) <= 40
    assert len({example.id for example in examples}) == len(examples)
    for row, example in zip(rows, examples, strict=True):
        supporting = [p for p in row["paragraphs"] if p["is_supporting"]]
        assert [p.text for p in example.passages] == [p["paragraph_text"] for p in supporting]
        assert len(example.passages) + len(example.distractors) == len(row["paragraphs"])
        assert example.answers[0] == row["answer"]


def test_musique_row_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [musique_row(), musique_row("q2", answerable=False)])
    [example] = read_examples(path, "musique")  # the unanswerable row is skipped
    assert example.id == "q1"
    assert example.answers == ("London", "London, England")
    assert example.passages == (
        Passage("Ada", "Ada was born in London."),
        Passage("", "Ada wrote notes."),
    )
    assert example.distractors == (Passage("Filler", "Cats sleep a lot."),)
    assert example.passages[1].render() == "Ada wrote notes."
    assert example.passages[0].render() == "Ada\nAda was born in London."


def test_generic_rows_and_auto_detection(tmp_path):
    generic = {
        "question": "Capital of Peru?",
        "answers": "Lima",
        "passages": [
            "Lima is the capital of Peru.",
            {"title": "Peru", "text": "Peru is in South America."},
        ],
        "distractors": [{"text": "Owls hunt at night."}],
    }
    path = write_jsonl(tmp_path / "mixed.jsonl", [musique_row(), generic])
    first, second = read_examples(path)
    assert first.id == "q1" and second.id == "line-2"
    assert second.answers == ("Lima",)
    assert second.passages == (
        Passage("", "Lima is the capital of Peru."),
        Passage("Peru", "Peru is in South America."),
    )
    assert second.distractors == (Passage("", "Owls hunt at night."),)


@pytest.mark.parametrize(
    "row, message",
    [
        (musique_row(question=""), r"example 'q1': field 'question'"),
        (musique_row(answer=None), r"example 'q1': field 'answer' is missing"),
        (musique_row(answer_aliases="x"), None),  # a single alias string is accepted
        (musique_row(answer_aliases=[1]), r"example 'q1': field 'answer_aliases'"),
        (musique_row(paragraphs=[]), r"example 'q1': field 'paragraphs' must be a non-empty list"),
        (
            musique_row(paragraphs=[{"title": "A", "paragraph_text": "B", "is_supporting": False}]),
            r"example 'q1': field 'paragraphs' has no paragraph with is_supporting",
        ),
        (
            musique_row(paragraphs=[{"title": "A", "is_supporting": True}]),
            r"example 'q1': field 'paragraphs\[0\]\.paragraph_text' is missing",
        ),
        (
            {"id": "g1", "question": "Q?", "passages": ["p"]},
            r"example 'g1': field 'answers' is missing",
        ),
        (
            {"id": "g2", "question": "Q?", "answers": [], "passages": ["p"]},
            r"example 'g2': field 'answers'",
        ),
        (
            {"id": "g3", "question": "Q?", "answers": ["a"], "passages": []},
            r"example 'g3': field 'passages'",
        ),
        ({"id": "g4", "question": "Q?", "answers": ["a"]}, r"example 'g4': field 'passages'"),
        (
            {"id": "g5", "question": "Q?", "answers": ["a"], "passages": [{"title": "t"}]},
            r"example 'g5': field 'passages\[0\]\.text' is missing",
        ),
        (
            {"question": "Q?", "answers": ["a"], "passages": ["p"], "distractors": "x"},
            r"example 'line-1': field 'distractors'",
        ),
    ],
)
def test_bad_rows_name_the_example_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    if message is None:
        assert read_examples(path)[0].answers == ("London", "x")
        return
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_file_level_errors(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [musique_row(), musique_row()])
    with pytest.raises(ValueError, match=r"dup.jsonl:2: example 'q1': field 'id' repeats line 1"):
        read_examples(path)
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps(musique_row()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        read_examples(bad_json)
    empty = write_jsonl(tmp_path / "empty.jsonl", [musique_row(answerable=False)])
    with pytest.raises(ValueError, match="no examples"):
        read_examples(empty)
    with pytest.raises(ValueError, match="input_format"):
        read_examples(empty, "squad")
