"""Pair sampler: the transformers backend, pair selection, judges, resumable output."""

from __future__ import annotations

import pytest

from solopo_kernels.data.backends import Generation, TransformersBackend, prompt_seed
from solopo_kernels.data.contexts import TargetLengths, build_contexts
from solopo_kernels.data.judge import make_sub_em_judge
from solopo_kernels.data.readers import read_context_rows
from solopo_kernels.data.sampler import SamplingConfig, sample_pairs
from solopo_kernels.tiny_models import tiny_llama

from .conftest import read_jsonl, write_jsonl

# The random tiny model never stops by itself: its samples are all cut by max_new_tokens.
SMALL = SamplingConfig(
    num_samples=3, max_new_tokens=6, batch_size=2, include_gold=True, keep_truncated=True
)


@pytest.fixture(scope="module")
def context_rows(examples, tiny_tok):
    return build_contexts(examples[:4], tiny_tok, TargetLengths.parse("512,1k"), progress=False)


@pytest.fixture(scope="module")
def backend(tiny_tok):
    return TransformersBackend(tiny_llama(tiny_tok), tiny_tok)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, backend, tiny_tok, context_rows):
    """An uninterrupted run of the tiny model over the context rows: (output path, summary)."""
    output = tmp_path_factory.mktemp("full") / "full.jsonl"
    return output, sample_pairs(
        context_rows, backend, tiny_tok, output, config=SMALL, progress=False
    )


class ScriptedBackend:
    """Returns fixed responses, prompt after prompt, and counts its calls."""

    name = "scripted"

    def __init__(self, responses):
        self.responses = list(responses)
        self.calls = 0

    def generate(self, prompt_ids, *, num_samples, **_):
        self.calls += 1
        texts = [self.responses.pop(0)[:num_samples] for _ in prompt_ids]
        return Generation(texts, sum(map(len, prompt_ids)), sum(len(t) for ts in texts for t in ts))


class InterruptAfter:
    """Wraps a backend and raises KeyboardInterrupt on call number ``calls + 1``."""

    def __init__(self, inner, calls):
        self.inner, self.left = inner, calls
        self.name = inner.name

    def generate(self, *args, **kwargs):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.inner.generate(*args, **kwargs)


def test_transformers_backend_is_seeded(backend, tiny_tok, context_rows):
    ids = [tiny_tok(row["prompt"][0]["content"])["input_ids"] for row in context_rows[:2]]
    options = dict(num_samples=3, max_new_tokens=6, temperature=0.85, top_p=1.0, top_k=0)
    first = backend.generate(ids, seed=5, **options)
    assert [len(texts) for texts in first.texts] == [3, 3]
    assert first.prompt_tokens == sum(map(len, ids))
    assert 0 < first.generated_tokens <= 2 * 3 * 6
    assert backend.generate(ids, seed=5, **options).texts == first.texts
    assert backend.generate(ids, seed=6, **options).texts != first.texts


def test_pairs_from_tiny_model_load_with_datasets(full_run, context_rows):
    import datasets

    output, summary = full_run
    assert summary.pairs + summary.no_incorrect == len(context_rows) == summary.processed
    assert summary.samples == 3 * len(context_rows) and summary.no_correct == 0
    assert summary.prompt_tokens == sum(row["metadata"]["short_length"] for row in context_rows)

    dataset = datasets.load_dataset("json", data_files=str(output), split="train")
    assert {"id", "prompt", "long_prompt", "chosen", "rejected", "metadata"} <= set(
        dataset.column_names
    )
    judge = make_sub_em_judge()
    by_id = {row["id"]: row for row in context_rows}
    for pair in dataset:
        context = by_id[pair["id"]]
        assert pair["prompt"] == context["prompt"] and pair["long_prompt"] == context["long_prompt"]
        assert (
            pair["chosen"][0]["role"] == "assistant" and pair["rejected"][0]["role"] == "assistant"
        )
        answers = pair["metadata"]["answers"]
        assert judge(pair["chosen"][0]["content"], answers)
        assert not judge(pair["rejected"][0]["content"], answers)
        assert pair["metadata"]["long_length"] == context["metadata"]["long_length"]
        assert pair["metadata"]["num_samples"] == 3
        assert pair["metadata"]["chosen_source"] in ("sample", "gold")


def simple_rows(n):
    return [
        {
            "id": f"r{i}",
            "prompt": f"Question {i}? Answer:",
            "long_prompt": f"Filler. Question {i}? Answer:",
            "answers": ["Poland", "Polska"],
        }
        for i in range(n)
    ]


def test_pair_selection_and_skips(tmp_path, tiny_tok):
    responses = [
        [
            "wrong",
            "",
            " so the answer is Poland. ",
            "Polska",
        ],  # pair: first correct, first incorrect
        ["nope", "no"],  # no correct response
        ["Poland", "the answer is Polska"],  # no incorrect response
        ["", "   "],  # only empty responses: neither
    ]
    output = tmp_path / "pairs.jsonl"
    config = SamplingConfig(num_samples=4, batch_size=3)
    summary = sample_pairs(
        simple_rows(4), ScriptedBackend(responses), tiny_tok, output, config=config, progress=False
    )
    assert (summary.pairs, summary.no_correct, summary.no_incorrect) == (1, 2, 1)
    [pair] = read_jsonl(output)
    assert (pair["id"], pair["chosen"], pair["rejected"]) == (
        "r0",
        " so the answer is Poland.",
        "wrong",
    )
    assert pair["metadata"]["num_correct"] == 2 and pair["metadata"]["chosen_source"] == "sample"
    records = read_jsonl(output.with_name("pairs.jsonl.progress"))[1:]
    assert [record["status"] for record in records] == [
        "pair",
        "no_correct",
        "no_incorrect",
        "no_correct",
    ]

    gold = tmp_path / "gold.jsonl"
    config = SamplingConfig(num_samples=2, batch_size=4, include_gold=True)
    sample_pairs(
        simple_rows(1),
        ScriptedBackend([["nope", "no"]]),
        tiny_tok,
        gold,
        config=config,
        progress=False,
    )
    [pair] = read_jsonl(gold)
    assert (pair["chosen"], pair["rejected"]) == (" The answer is Poland.", "nope")
    assert pair["metadata"]["chosen_source"] == "gold" and pair["metadata"]["num_correct"] == 0


def test_user_judge(tmp_path, tiny_tok):
    output = tmp_path / "pairs.jsonl"
    backend = ScriptedBackend([["maybe", "yes indeed"]])
    sample_pairs(
        simple_rows(1),
        backend,
        tiny_tok,
        output,
        config=SamplingConfig(num_samples=2),
        judge=lambda response, answers: response.startswith("yes"),
        progress=False,
    )
    [pair] = read_jsonl(output)
    assert (pair["chosen"], pair["rejected"]) == ("yes indeed", "maybe")


def test_resume_matches_an_uninterrupted_run(tmp_path, full_run, backend, tiny_tok, context_rows):
    full = full_run[0]
    full_rows = full.read_text()
    full_progress = full.with_name("full.jsonl.progress").read_text()
    assert len(full_rows.splitlines()) == len(context_rows)  # every example makes a pair here

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        sample_pairs(
            context_rows,
            InterruptAfter(backend, 1),
            tiny_tok,
            resumed,
            config=SMALL,
            progress=False,
        )
    assert len(read_jsonl(resumed)) == SMALL.batch_size  # the first batch is on disk
    summary = sample_pairs(context_rows, backend, tiny_tok, resumed, config=SMALL, progress=False)
    assert (summary.already_done, summary.processed) == (2, 2)
    assert resumed.read_text() == full_rows
    assert (tmp_path / "resumed.jsonl.progress").read_text() == full_progress

    # A crash in the middle of a write: rows of the second batch written, one of them halfway,
    # and its progress records missing.
    crashed = tmp_path / "crashed.jsonl"
    lines = full_rows.splitlines(keepends=True)
    crashed.write_text("".join(lines[:3]) + lines[3][:40])
    progress_lines = full_progress.splitlines(keepends=True)
    (tmp_path / "crashed.jsonl.progress").write_text("".join(progress_lines[:3]))
    counting = InterruptAfter(backend, 10)
    sample_pairs(context_rows, counting, tiny_tok, crashed, config=SMALL, progress=False)
    assert counting.left == 10 - 1  # batch 1 was generated again, batch 0 was not
    assert crashed.read_text() == full_rows
    assert (tmp_path / "crashed.jsonl.progress").read_text() == full_progress

    # Nothing left to do: a rerun generates nothing and writes nothing.
    idle = InterruptAfter(backend, 0)
    summary = sample_pairs(context_rows, idle, tiny_tok, full, config=SMALL, progress=False)
    assert summary.processed == 0 and summary.pairs == len(context_rows)
    assert full.read_text() == full_rows


def test_resume_refuses_other_settings(tmp_path, tiny_tok):
    output = tmp_path / "pairs.jsonl"
    sample_pairs(
        simple_rows(1),
        ScriptedBackend([["a", "Poland"]]),
        tiny_tok,
        output,
        config=SamplingConfig(num_samples=2),
        progress=False,
    )
    with pytest.raises(ValueError, match=r"different settings \(num_samples\)"):
        sample_pairs(
            simple_rows(1),
            ScriptedBackend([]),
            tiny_tok,
            output,
            config=SamplingConfig(num_samples=3),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"different settings \(model\)"):
        sample_pairs(
            simple_rows(1),
            ScriptedBackend([]),
            tiny_tok,
            output,
            config=SamplingConfig(num_samples=2),
            settings={"model": "x"},
            progress=False,
        )

    (tmp_path / "pairs.jsonl.progress").unlink()
    with pytest.raises(ValueError, match="exists but pairs.jsonl.progress does not"):
        sample_pairs(simple_rows(1), ScriptedBackend([]), tiny_tok, output, progress=False)
    summary = sample_pairs(
        simple_rows(1),
        ScriptedBackend([["b", "Poland"]]),
        tiny_tok,
        output,
        config=SamplingConfig(num_samples=2),
        overwrite=True,
        progress=False,
    )
    assert summary.pairs == 1 and read_jsonl(output)[0]["rejected"] == "b"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answers": []}, r"example 'r0': field 'answers'"),
        ({"answers": None}, r"example 'r0': field 'answers'"),
        ({"prompt": ""}, r"example 'r0': field 'prompt'"),
        (
            {"long_prompt": [{"role": "user", "content": "x"}]},
            r"example 'r0': fields 'prompt' and 'long_prompt' differ",
        ),
        ({"id": ""}, r"field 'id' must be a non-empty string"),
    ],
)
def test_bad_context_rows(tmp_path, change, message):
    path = write_jsonl(tmp_path / "contexts.jsonl", [{**simple_rows(1)[0], **change}])
    with pytest.raises(ValueError, match=message):
        read_context_rows(path)


def test_duplicate_context_ids_and_bad_config(tmp_path):
    path = write_jsonl(tmp_path / "contexts.jsonl", simple_rows(1) * 2)
    with pytest.raises(ValueError, match=r":2: example 'r0': field 'id' is repeated"):
        read_context_rows(path)
    for bad in ({"num_samples": 0}, {"temperature": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


@pytest.mark.parametrize("chunk_size", [1, 3, 1 << 16])
def test_drop_partial_line(tmp_path, chunk_size):
    from solopo_kernels.data.store import drop_partial_line as _drop_partial_line

    path = tmp_path / "rows.jsonl"
    cases = [
        (b"", b""),
        (b"a\n", b"a\n"),
        (b"a\nbc", b"a\n"),
        (b"abc", b""),
        (b"aa\nbb\n" + b"c" * 9, b"aa\nbb\n"),
    ]
    for content, expected in cases:
        path.write_bytes(content)
        _drop_partial_line(path, chunk_size)
        assert path.read_bytes() == expected


def test_resume_after_a_stop_before_the_header(tmp_path, tiny_tok):
    output = tmp_path / "pairs.jsonl"
    output.write_text("")
    (tmp_path / "pairs.jsonl.progress").write_text("")
    summary = sample_pairs(
        simple_rows(1),
        ScriptedBackend([["a", "Poland"]]),
        tiny_tok,
        output,
        config=SamplingConfig(num_samples=2),
        progress=False,
    )
    assert summary.pairs == 1 and read_jsonl(output)[0]["chosen"] == "Poland"


class RecordingBackend:
    """Records the seeds it is given; every response is wrong, so no pairs are written."""

    name = "recording"

    def __init__(self):
        self.prompt_seeds = []

    def generate(self, prompt_ids, *, num_samples, prompt_seeds, **_):
        self.prompt_seeds += list(prompt_seeds)
        return Generation([["x"] * num_samples for _ in prompt_ids], 0, 0)


def test_per_example_seed_ranges_do_not_overlap(tmp_path, tiny_tok):
    # Sample j of an example is seeded prompt_seed + j (vLLM's own rule for n samples), so the
    # ranges [seed, seed + n) of different examples must be disjoint: consecutive per-prompt
    # seeds (seed + index) would make example i + 1's samples example i's shifted by one.
    num_samples = 32
    seeds = sorted(prompt_seed(0, f"example-{i}") for i in range(20_000))
    assert all(b - a >= num_samples for a, b in zip(seeds, seeds[1:]))
    assert all(0 <= s < 2**62 for s in seeds)
    assert prompt_seed(0, "a") == prompt_seed(0, "a") != prompt_seed(1, "a")

    # The sampler seeds each example by its id: the same seeds whatever the batch size.
    recorded = []
    for batch_size in (1, 3):
        backend = RecordingBackend()
        config = SamplingConfig(num_samples=4, batch_size=batch_size)
        sample_pairs(
            simple_rows(5),
            backend,
            tiny_tok,
            tmp_path / f"b{batch_size}.jsonl",
            config=config,
            progress=False,
        )
        recorded.append(backend.prompt_seeds)
    assert recorded[0] == recorded[1] == [prompt_seed(0, f"r{i}") for i in range(5)]


class CutBackend(ScriptedBackend):
    """A scripted backend that also reports which samples ``max_new_tokens`` cut."""

    def __init__(self, responses, truncated):
        super().__init__(responses)
        self.truncated = list(truncated)

    def generate(self, prompt_ids, *, num_samples, **options):
        out = super().generate(prompt_ids, num_samples=num_samples, **options)
        out.truncated = [self.truncated.pop(0) for _ in prompt_ids]
        return out


def test_a_sample_cut_by_max_new_tokens_is_never_chosen_or_rejected(tmp_path, tiny_tok):
    responses = [
        ["The answer is Poland", "It is Fran", "So the answer is Polska.", "Norway."],
        ["The answer is Poland.", "Wrong and cut"],  # the only incorrect sample is cut
    ]
    truncated = [[True, True, False, False], [False, True]]
    output = tmp_path / "pairs.jsonl"
    summary = sample_pairs(
        simple_rows(2),
        CutBackend(responses, truncated),
        tiny_tok,
        output,
        config=SamplingConfig(num_samples=4, batch_size=2),
        progress=False,
    )
    [pair] = read_jsonl(output)
    assert (pair["chosen"], pair["rejected"]) == ("So the answer is Polska.", "Norway.")
    assert pair["metadata"]["num_truncated"] == 2 and pair["metadata"]["num_correct"] == 1
    assert (summary.pairs, summary.no_incorrect, summary.truncated) == (1, 1, 3)
    assert "3 samples were cut by max_new_tokens and left out" in str(summary)

    # Asked for: the cut samples are judged like the others.
    kept = tmp_path / "kept.jsonl"
    config = SamplingConfig(num_samples=4, batch_size=2, keep_truncated=True)
    summary = sample_pairs(
        simple_rows(2), CutBackend(responses, truncated), tiny_tok, kept, config=config,
        progress=False,
    )  # fmt: skip
    first, second = read_jsonl(kept)
    assert (first["chosen"], first["rejected"]) == ("The answer is Poland", "It is Fran")
    assert second["rejected"] == "Wrong and cut" and summary.pairs == 2
    assert "(judged: keep_truncated)" in str(summary)


def test_transformers_backend_reports_cut_samples(tiny_tok):
    model = tiny_llama(tiny_tok)
    backend = TransformersBackend(model, tiny_tok)
    ids = [tiny_tok("where is the key ?")["input_ids"]] * 2
    options = dict(num_samples=3, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    model.generation_config.eos_token_id = None  # nothing stops a sample: every one is cut
    out = backend.generate(ids, max_new_tokens=3, **options)
    assert out.truncated == [[True] * 3] * 2 and out.generated_tokens == 2 * 3 * 3
    model.generation_config.eos_token_id = list(range(len(tiny_tok)))  # every token stops one
    out = backend.generate(ids, max_new_tokens=3, **options)
    assert out.truncated == [[False] * 3] * 2 and out.generated_tokens == 2 * 3
