"""solopo-data on real pretrained models, run the way users run it (the command line, the
converted folder as --tokenizer and --model): build-contexts counts lengths in the model's own
tokens (SmolLM2's chat template; Gemma's plain text, marked heavy), and sample-pairs on
SmolLM2-135M-Instruct with transformers (heavy) writes pairs a user would accept. The same
sampling on vLLM is in test_data_vllm.py (vLLM's own virtualenv)."""

from __future__ import annotations

import pytest

from solopo_kernels.data.cli import main

from .conftest import (
    REAL_SAMPLING,
    biography_contexts,
    check_pairs_a_user_would_accept,
    read_jsonl,
)


def _within_one_percent(length: int, target: int) -> bool:
    return abs(length - target) <= target / 100


def test_build_contexts_counts_smollm2_chat_tokens(smollm2_folder, sample_path, tmp_path):
    from transformers import AutoTokenizer

    output = tmp_path / "contexts.jsonl"
    command = ["build-contexts", "--input", str(sample_path), "--output", str(output)]
    command += ["--tokenizer", str(smollm2_folder), "--target-lengths", "512,1k"]
    assert main([*command, "--limit", "6", "--quiet"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    rows = read_jsonl(output)
    assert {row["metadata"]["target_length"] for row in rows} == {512, 1024}
    for row in rows:
        # What the model reads: the conversation rendered by its chat template, up to the
        # assistant's turn (SmolLM2's default system message included).
        ids = tokenizer.apply_chat_template(
            row["long_prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert tokenizer.decode(ids[:3]) == "<|im_start|>system\n"
        target = row["metadata"]["target_length"]
        assert len(ids) == row["metadata"]["long_length"]
        assert _within_one_percent(len(ids), target), (row["id"], len(ids), target)


@pytest.mark.heavy  # ~10 s more of CI; SmolLM2's case runs the same code by default
def test_build_contexts_counts_gemma3_tokens_in_plain_text(gemma3_folder, sample_path, tmp_path):
    from transformers import AutoTokenizer

    output = tmp_path / "contexts.jsonl"
    command = ["build-contexts", "--input", str(sample_path), "--output", str(output)]
    command += ["--tokenizer", str(gemma3_folder), "--target-lengths", "1k", "--format"]
    assert main([*command, "standard", "--limit", "4", "--quiet"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(gemma3_folder)
    for row in read_jsonl(output):
        assert isinstance(row["long_prompt"], str) and row["long_prompt"].endswith("Answer:")
        ids = tokenizer(row["long_prompt"])["input_ids"]  # with <bos>, as the model reads it
        assert ids[0] == tokenizer.bos_token_id and len(ids) == row["metadata"]["long_length"] + 1
        assert _within_one_percent(len(ids), 1024), (row["id"], len(ids))


@pytest.mark.heavy  # ~2 min on two cores; CI's vLLM pass samples SmolLM2's pairs (test_data_vllm.py)
def test_sample_pairs_on_smollm2_with_transformers(smollm2_folder, tmp_path, capsys):
    from transformers import AutoTokenizer

    contexts = biography_contexts(smollm2_folder, tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    command = ["sample-pairs", "--input", str(contexts), "--output", str(pairs), "--quiet"]
    command += ["--model", str(smollm2_folder), "--backend", "transformers", "--dtype", "float32"]
    assert main([*command, *REAL_SAMPLING, "--batch-size", "3", "--limit", "3"]) == 0
    assert "pairs written in total" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    check_pairs_a_user_would_accept(read_jsonl(pairs), tokenizer, max_new_tokens=24)
