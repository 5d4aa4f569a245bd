"""Shared fixtures of the data tests: the bundled sample, offline tokenizers, a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from solopo_kernels.data.cli import SAMPLE_PATH, main, tiny_tokenizer_for  # noqa: E402
from solopo_kernels.data.contexts import TEMPLATES  # noqa: E402
from solopo_kernels.data.judge import make_sub_em_judge  # noqa: E402
from solopo_kernels.data.readers import read_examples  # noqa: E402


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` as JSONL and return the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of objects."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def corpus_texts(examples) -> list[str]:
    """Every text a prompt built from ``examples`` can contain."""
    texts = [part for template in TEMPLATES.values() for part in (template.header, template.footer)]
    for example in examples:
        texts += [example.question, *example.answers, "Answer:", "The answer is"]
        texts += [passage.render() for passage in (*example.passages, *example.distractors)]
    return texts


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE_PATH


@pytest.fixture(scope="session")
def examples():
    return read_examples(SAMPLE_PATH)


@pytest.fixture(scope="session")
def tiny_tok(examples):
    """Word-level tokenizer with a chat template over the sample's words."""
    return tiny_tokenizer_for(corpus_texts(examples))


@pytest.fixture(scope="session")
def bpe_tok(examples):
    """A byte-level BPE tokenizer trained on the sample: token counts are not additive."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_texts(examples), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def save_tiny_model(directory: Path, tokenizer) -> Path:
    """Save a tiny random Llama and ``tokenizer`` to ``directory`` (``save_pretrained``), for the
    engines that load a model from disk (vLLM). Head size 32: vLLM's CPU attention needs one of
    its supported head sizes (the default tiny Llama's 8 is not)."""
    from solopo_kernels.tiny_models import tiny_llama

    model = tiny_llama(
        tokenizer, hidden_size=64, num_heads=2, num_kv_heads=1, max_position_embeddings=2048
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_biographies(path: Path, count: int = 40) -> Path:
    """One-hop QA in the generic schema: ``count`` short biographies (born in, works for), each
    the passage of the question "Which company does <name> work for?". The other biographies
    are the distractor pool; every company is distinct, so no distractor holds the answer."""
    first = "Maria Tomas Anna Kenji Lena Omar Ines Pavel Sofia Ravi".split()
    last = "Okafor Reyes Weber Sato Holm Haddad Duarte Novak".split()
    cities = "Lisbon Quito Graz Osaka Bergen Tunis Porto Brno Lyon Pune".split()
    brands = "Northwind Bluefield Orchid Ridgeway Cobalt Saffron Atlas Vega".split()
    trades = ("Shipping", "Bank", "Pharma", "Motors", "Mining")
    companies = [f"{brand} {trade}" for brand in brands for trade in trades]
    rows = []
    for i in range(count):
        name = f"{first[i % 10]} {last[(i * 3) % 8]}"
        passage = f"{name} was born in {cities[(i * 7) % 10]}. {name} works for {companies[i]}."
        question = f"Which company does {name} work for?"
        rows.append(
            {
                "id": f"bio{i}",
                "question": question,
                "answers": [companies[i]],
                "passages": [passage],
            }
        )
    return write_jsonl(path, rows)


#: Sampling options of the real-model tests (transformers and vLLM): few, short, finished answers.
REAL_SAMPLING = ["--num-samples", "4", "--temperature", "0.7", "--max-new-tokens", "24"]
#: Chat-template tokens that must not leak into a response (decoding skips special tokens).
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def biography_contexts(folder: Path, tmp_path: Path) -> Path:
    """One-hop biography questions in SmolLM2's chat format, answer-only instruction."""
    qa = write_biographies(tmp_path / "biographies.jsonl")
    output = tmp_path / "contexts.jsonl"
    command = ["build-contexts", "--input", str(qa), "--output", str(output), "--quiet"]
    command += ["--tokenizer", str(folder), "--target-lengths", "512", "--template", "qa"]
    assert main(command) == 0
    return output


def check_pairs_a_user_would_accept(pairs: list[dict[str, Any]], tokenizer, max_new_tokens: int):
    """Chosen holds the gold answer, rejected does not; both are whole assistant messages that
    the model finished (fewer tokens than max_new_tokens), sampled (not the gold reference)."""
    judge = make_sub_em_judge()
    assert pairs, "no pair: the check needs at least one"
    for pair in pairs:
        answers = pair["metadata"]["answers"]
        for side in ("chosen", "rejected"):
            [message] = pair[side]
            text = message["content"]
            assert message["role"] == "assistant" and text == text.strip() and text
            assert not any(token in text for token in SPECIAL), (side, text)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(tokens) < max_new_tokens, (side, text)  # finished, not cut
        assert judge(pair["chosen"][0]["content"], answers), pair["chosen"]
        assert not judge(pair["rejected"][0]["content"], answers), pair["rejected"]
        assert pair["metadata"]["chosen_source"] == "sample"
        assert 1 <= pair["metadata"]["num_correct"] < pair["metadata"]["num_samples"]
