"""Shared fixtures of the data tests: the bundled sample, offline tokenizers, a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from solopo_kernels.data.cli import SAMPLE_PATH, tiny_tokenizer_for  # noqa: E402
from solopo_kernels.data.contexts import TEMPLATES  # noqa: E402
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
