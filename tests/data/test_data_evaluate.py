"""``solopo-data evaluate``: items by length, greedy batches grouped by length, the judge, the
resumable answers, the accuracy table, the paired comparison, the command line."""

from __future__ import annotations

import json
import math

import pytest

from solopo_kernels.data.backends import Generation, TransformersBackend
from solopo_kernels.data.cli import main as solopo_data
from solopo_kernels.data.contexts import TargetLengths, build_contexts
from solopo_kernels.data.evaluate import (
    EvaluationConfig,
    accuracy_table,
    compare_runs,
    evaluate,
    evaluation_items,
    length_labels,
    mcnemar_p,
)
from solopo_kernels.tiny_models import tiny_llama

from .conftest import read_jsonl, write_jsonl


def rows_at(length, n=4, answers=("Poland",)):
    """``n`` context rows whose long prompt has target ``length`` (string prompts)."""
    return [
        {
            "id": f"q{i}",
            "prompt": f"Passage {i}. Question {i}? Answer:",
            "long_prompt": f"{'Filler. ' * (length // 100 + i)}Passage {i}. Question {i}? Answer:",
            "answers": list(answers),
            "metadata": {"target_length": length},
        }
        for i in range(n)
    ]


class EchoBackend:
    """Answers each prompt with a response chosen by a function of its token ids; records each
    call's prompts and options."""

    name = "echo"

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def generate(self, prompt_ids, *, num_samples, **options):
        self.calls.append({"prompts": [list(ids) for ids in prompt_ids], **options})
        texts = [[self.answer(ids)] * num_samples for ids in prompt_ids]
        return Generation(texts, sum(map(len, prompt_ids)), 3 * len(prompt_ids))


class InterruptAfter:
    """Raises KeyboardInterrupt on call number ``calls + 1`` of the wrapped backend."""

    def __init__(self, inner, calls):
        self.inner, self.left, self.name = inner, calls, inner.name

    def generate(self, *args, **kwargs):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.inner.generate(*args, **kwargs)


def test_items_share_the_short_prompt_and_label_long_prompts_by_target():
    items = evaluation_items([rows_at(512), rows_at(1024)])
    assert [item.id for item in items] == [
        *(f"q{i}@{label}" for i in range(4) for label in ("short", "512")),
        *(f"q{i}@1024" for i in range(4)),
    ]
    assert {item.length for item in items} == {"short", "512", "1024"}
    assert len({item.key for item in items}) == len(items)
    assert [item.id for item in evaluation_items([rows_at(512)], "short")] == [
        f"q{i}@short" for i in range(4)
    ]
    assert [item.length for item in evaluation_items([rows_at(512)], "long")] == ["512"] * 4


def test_items_from_two_builds_of_one_example_are_refused():
    other_answers = rows_at(1024, answers=("France",))
    with pytest.raises(ValueError, match="'q0'.*different short prompt or answers"):
        evaluation_items([rows_at(512), other_answers])
    rebuilt = rows_at(512)
    rebuilt[2]["long_prompt"] = "Another build. " + rebuilt[2]["long_prompt"]
    with pytest.raises(ValueError, match="'q2'.*different long prompt at 512"):
        evaluation_items([rows_at(512), rebuilt])


def test_many_target_lengths_are_binned():
    rows = [{"metadata": {"target_length": 3000 + 100 * i}} for i in range(20)]
    labels = length_labels(rows)
    assert labels[0] == "3000-3475" and labels[-1] == "4428-4900"  # width ceil(1901 / 4)
    assert len(set(labels)) == 4
    assert length_labels([{"metadata": {}}, {"metadata": {"long_length": 700}}]) == ["long", "700"]


def test_answers_are_greedy_grouped_by_length_and_judged(tmp_path, tiny_tok):
    files = [rows_at(512, n=5), rows_at(1024, n=5)]
    items = evaluation_items(files)
    # right on the short prompts and on the long prompts up to 40 tokens
    backend = EchoBackend(lambda ids: "The answer is Poland." if len(ids) < 40 else "Warsaw")
    run = evaluate(
        items,
        backend,
        tiny_tok,
        tmp_path / "answers.jsonl",
        config=EvaluationConfig(max_new_tokens=7, batch_size=2),
        progress=False,
    )
    lengths = {item.id: item.length for item in items}
    for call in backend.calls:
        assert call["temperature"] == 0.0 and call["max_new_tokens"] == 7
        prompts = call["prompts"]
        assert [len(ids) for ids in prompts] == sorted(len(ids) for ids in prompts)
    # each call holds one length label: 3 calls per label of 5 items at batch size 2
    assert len(backend.calls) == 9
    assert [answer["id"] for answer in run.answers] == [item.id for item in items]
    for answer in run.answers:
        assert answer["length"] == lengths[answer["id"]]
        assert answer["correct"] == (answer["prompt_tokens"] < 40)
    table = {row["length"]: row for row in accuracy_table(run.answers)}
    assert list(table) == ["short", "512", "1024"]
    short = table["short"]
    assert (short["questions"], short["correct"]) == (5, 5)
    assert (short["accuracy"], short["stderr"]) == (1, 0)
    for label in ("512", "1024"):
        row = table[label]
        p = row["correct"] / 5
        assert row["accuracy"] == p and math.isclose(row["stderr"], math.sqrt(p * (1 - p) / 5))
    assert run.answered == len(items) == 15 and run.already_done == 0


def test_an_interrupted_run_resumes_to_the_same_answers(tmp_path, tiny_tok):
    items = evaluation_items([rows_at(512, n=6), rows_at(1024, n=6)])

    def answer(ids):
        return f"The answer is {'Poland' if sum(ids) % 3 else 'Spain'}."

    full = evaluate(
        items, EchoBackend(answer), tiny_tok, tmp_path / "full.jsonl", progress=False
    ).answers
    path = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(items, InterruptAfter(EchoBackend(answer), 2), tiny_tok, path, progress=False)
    done = len(read_jsonl(path))
    assert 0 < done < len(items)
    backend = EchoBackend(answer)
    resumed = evaluate(items, backend, tiny_tok, path, progress=False)
    assert resumed.already_done == done and resumed.answered == len(items) - done
    assert sum(len(call["prompts"]) for call in backend.calls) == len(items) - done
    assert resumed.answers == full
    assert len(read_jsonl(path)) == len(items)  # nothing answered twice

    # other settings, or the same ids rebuilt with other content, are refused
    with pytest.raises(ValueError, match="different settings"):
        evaluate(items, backend, tiny_tok, path, settings={"model": "other"}, progress=False)
    rebuilt = rows_at(512, n=6)
    rebuilt[0]["long_prompt"] = "Rebuilt. " + rebuilt[0]["long_prompt"]
    with pytest.raises(ValueError, match="rebuilt under the same ids"):
        evaluate(evaluation_items([rebuilt]), backend, tiny_tok, path, progress=False)


def test_mcnemar_exact_p_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_p(3, 3) == 1.0
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)


def test_paired_comparison_per_length():
    def run(correct):
        return [
            {"id": f"q{i}@short", "key": f"k{i}", "length": "short", "correct": c}
            for i, c in enumerate(correct)
        ]

    after, before = run([1, 1, 1, 0, 1]), run([0, 0, 1, 1, 1])
    [row] = compare_runs(after, before)
    assert (row["questions"], row["only_this"], row["only_baseline"]) == (5, 2, 1)
    assert row["difference"] == pytest.approx(0.2)
    assert row["p_value"] == pytest.approx(mcnemar_p(2, 1))
    before[0]["key"] = "other"
    with pytest.raises(ValueError, match="other content"):
        compare_runs(after, before)


def test_transformers_backend_greedy_matches_generate(tiny_tok):
    import torch

    model = tiny_llama(tiny_tok, seed=3)
    backend = TransformersBackend(model, tiny_tok)
    ids = [tiny_tok("what is the capital of poland ?")["input_ids"]]
    options = dict(num_samples=1, max_new_tokens=6, top_p=1.0, top_k=0, prompt_seeds=[0])
    first = backend.generate(ids, temperature=0.0, seed=1, **options)
    assert backend.generate(ids, temperature=0.0, seed=2, **options).texts == first.texts
    with torch.no_grad():
        expected = model.generate(
            torch.tensor(ids), do_sample=False, max_new_tokens=6, pad_token_id=tiny_tok.pad_token_id
        )[0, len(ids[0]) :]
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    tokens = expected.tolist()
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    assert first.texts == [[tiny_tok.decode(tokens[:end], skip_special_tokens=True)]]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory, examples, tiny_tok):
    folder = tmp_path_factory.mktemp("contexts")
    paths = []
    for target in ("300", "600"):
        rows = build_contexts(examples[:5], tiny_tok, TargetLengths.parse(target), progress=False)
        paths.append(write_jsonl(folder / f"contexts-{target}.jsonl", rows))
    return paths


def _evaluate_argv(contexts, output, *extra):
    argv = ["evaluate", "--output", str(output), "--model", "tiny", "--tokenizer", "tiny"]
    for path in contexts:
        argv += ["--input", str(path)]
    return [*argv, "--max-new-tokens", "4", "--batch-size", "3", "--quiet", *extra]


def test_command_writes_the_report_and_compares_with_a_baseline(tmp_path, contexts, capsys):
    first = tmp_path / "before.json"
    assert solopo_data(_evaluate_argv(contexts, first)) == 0
    report = json.loads(first.read_text())
    assert [row["length"] for row in report["accuracy"]] == ["short", "300", "600"]
    assert all(row["questions"] == 5 for row in report["accuracy"])
    assert len(report["answers"]) == 15 and report["run"]["answered"] == 15
    assert report["settings"]["model"] == "tiny" and report["settings"]["backend"] == "transformers"
    table = first.with_suffix(".md").read_text()
    assert "| context | questions | accuracy (%) |" in table and "| 600 | 5 |" in table
    assert "| 600 | 5 |" in capsys.readouterr().out

    # rerun: everything is resumed, nothing answered again; the report is the same
    assert solopo_data(_evaluate_argv(contexts, first)) == 0
    again = json.loads(first.read_text())
    assert again["run"]["answered"] == 0 and again["run"]["already_done"] == 15
    assert again["answers"] == report["answers"]

    second = tmp_path / "after.json"
    assert solopo_data(_evaluate_argv(contexts, second, "--baseline", str(first))) == 0
    compared = json.loads(second.read_text())
    # the same random model: identical answers, no discordant question
    assert [row["length"] for row in compared["comparison"]] == ["short", "300", "600"]
    for row in compared["comparison"]:
        assert (row["only_this"], row["only_baseline"], row["p_value"]) == (0, 0, 1.0)
    assert "McNemar p" in second.with_suffix(".md").read_text()


def test_command_errors_name_the_problem(tmp_path, contexts, capsys):
    output = tmp_path / "out.json"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": "p", "answers": ["a"]}])
    assert solopo_data(_evaluate_argv([bad], output)) == 2
    assert "long_prompt" in capsys.readouterr().err
    assert solopo_data(_evaluate_argv(contexts, tmp_path / "out.txt")) == 2
    assert "--output" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert solopo_data(_evaluate_argv(contexts, output, "--baseline", str(missing))) == 2
    assert "--baseline" in capsys.readouterr().err
