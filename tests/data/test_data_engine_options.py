"""Engine options of sample-pairs (--vllm-arg/--vllm-args) and the backend flags' checks, without
an engine: every case here is refused before a model loads."""

from __future__ import annotations

import importlib.util

import pytest

from solopo_kernels.data.backends import parse_vllm_args
from solopo_kernels.data.cli import main

from .conftest import write_jsonl


def test_parse_vllm_args():
    assert parse_vllm_args(
        ["tensor_parallel_size=2", "enable-prefix-caching=false", "quantization=awq", 'x={"a": 1}']
    ) == {
        "tensor_parallel_size": 2,
        "enable_prefix_caching": False,
        "quantization": "awq",  # not JSON: kept as a string
        "x": {"a": 1},
    }
    assert parse_vllm_args(["max_model_len=4096"], '{"max_model_len": 2048, "seed": 3}') == {
        "max_model_len": 4096,  # KEY=VALUE wins over the JSON object
        "seed": 3,
    }
    assert parse_vllm_args(["served_model_name="]) == {"served_model_name": ""}
    for bad in (["novalue"], ["=3"], ["two words=1"]):
        with pytest.raises(ValueError, match="--vllm-arg: expected KEY=VALUE"):
            parse_vllm_args(bad)
    with pytest.raises(ValueError, match="--vllm-args: not valid JSON"):
        parse_vllm_args([], "{tensor_parallel_size: 2}")
    with pytest.raises(ValueError, match="--vllm-args: must be a JSON object"):
        parse_vllm_args([], "[1, 2]")


@pytest.fixture
def contexts(tmp_path):
    row = {"id": "r0", "prompt": "Question? Answer:", "long_prompt": "Filler. Question? Answer:"}
    return write_jsonl(tmp_path / "contexts.jsonl", [{**row, "answers": ["Poland"]}])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "transformers", "--vllm-arg", "x=1"], "engine options need --backend vllm"),
        (["--backend", "transformers", "--base-url", "http://h/v1"], "--base-url: only the openai"),
        (["--backend", "openai"], "--base-url: the openai backend needs"),
        (["--backend", "vllm", "--vllm-arg", "novalue"], "--vllm-arg: expected KEY=VALUE"),
        (["--backend", "vllm", "--vllm-args", "[]"], "--vllm-args: must be a JSON object"),
    ],
)
def test_bad_backend_flags(tmp_path, contexts, capsys, flags, message):
    argv = ["sample-pairs", "--input", str(contexts), "--output", str(tmp_path / "p.jsonl")]
    assert main([*argv, "--model", "unused", "--tokenizer", "tiny", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_engine_options_with_auto_and_no_vllm(tmp_path, contexts, capsys):
    argv = ["sample-pairs", "--input", str(contexts), "--output", str(tmp_path / "p.jsonl")]
    argv += ["--model", "unused", "--tokenizer", "tiny", "--vllm-arg", "max_model_len=64"]
    assert main(argv) == 2
    assert "auto picks transformers without vLLM" in capsys.readouterr().err
    tiny = ["--model", "tiny", "--tokenizer", "tiny", "--vllm-arg", "max_model_len=64"]
    assert main([*argv[:5], *tiny]) == 2
    assert "--model tiny is built in memory" in capsys.readouterr().err
