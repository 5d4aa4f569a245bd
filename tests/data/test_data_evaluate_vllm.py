"""``solopo-data evaluate`` on a real model (SmolLM2-135M-Instruct with its chat template): the
transformers backend's report, and ``--backend vllm`` (vLLM's CPU engine) giving its greedy
answers. Skipped where vLLM is not installed (it has its own virtualenv in CI: .ci/run), so the
real model's evaluate runs in that pass only: the default one stays cheap."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("vllm")

# One GiB of KV cache per engine (vLLM's CPU default takes a share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from solopo_kernels.data.cli import main as solopo_data  # noqa: E402
from solopo_kernels.data.contexts import TEMPLATES, TargetLengths, build_contexts  # noqa: E402
from solopo_kernels.data.judge import make_sub_em_judge  # noqa: E402
from solopo_kernels.pretrained import SMOLLM2  # noqa: E402

from ..pretrained_models import folder_or_skip  # noqa: E402
from .conftest import write_jsonl  # noqa: E402

pytestmark = pytest.mark.vllm

ENGINE = ["max_model_len=1024", "enforce_eager=true", "distributed_executor_backend=uni"]


def test_vllm_answers_are_the_transformers_answers(tmp_path, examples, monkeypatch):
    from transformers import AutoTokenizer

    folder = folder_or_skip(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = build_contexts(
        examples[:4],
        tokenizer,
        TargetLengths.parse("512"),
        template=TEMPLATES["qa"],
        progress=False,
    )
    contexts = write_jsonl(tmp_path / "contexts.jsonl", rows)
    reports = {}
    for backend in ("transformers", "vllm"):
        output = tmp_path / f"{backend}.json"
        argv = ["evaluate", "--input", str(contexts), "--output", str(output)]
        argv += ["--model", str(folder), "--backend", backend, "--dtype", "float32"]
        argv += ["--max-new-tokens", "16", "--quiet"]
        if backend == "vllm":
            # the engine core in this process: one process start less on 2 cores
            monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            for option in ENGINE:
                argv += ["--vllm-arg", option]
        else:
            argv += ["--device", "cpu"]
        assert solopo_data(argv) == 0
        reports[backend] = json.loads(output.read_text())
    hf, vllm = (reports[name]["answers"] for name in ("transformers", "vllm"))
    assert [a["id"] for a in hf] == [a["id"] for a in vllm]
    assert [a["prompt_tokens"] for a in hf] == [a["prompt_tokens"] for a in vllm]
    # float32 greedy on two engines: the same answers, up to a rare flip where two tokens tie
    # to rounding (one of eight allowed)
    same = sum(a["response"] == b["response"] for a, b in zip(hf, vllm, strict=True))
    assert same >= len(hf) - 1, [(a["response"], b["response"]) for a, b in zip(hf, vllm)]
    assert reports["vllm"]["settings"]["backend"] == "vllm"
    # the transformers report, as a user runs evaluate on the real model with its own chat
    # template: the lengths, the prompt build-contexts measured, judged answers
    assert [row["length"] for row in reports["transformers"]["accuracy"]] == ["short", "512"]
    by_id = {row["id"]: row for row in rows}
    judge = make_sub_em_judge()
    for answer in hf:
        row = by_id[answer["example_id"]]
        field = "short_length" if answer["length"] == "short" else "long_length"
        assert answer["prompt_tokens"] == row["metadata"][field]
        assert answer["response"] and "<|im_end|>" not in answer["response"]
        assert answer["correct"] == judge(answer["response"], answer["answers"])
