"""The vLLM backends on real engines, on the CPU: the offline engine (``vllm.LLM``), the
``solopo-data sample-pairs --backend vllm`` command killed with SIGKILL and rerun, a real
``vllm serve`` on 127.0.0.1 through the OpenAI-compatible backend (a tiny random Llama saved to
disk), and sample-pairs on SmolLM2-135M-Instruct's converted folder (solopo_kernels.pretrained).
Nothing comes from a model hub. Skipped where vLLM is not installed (it has its own
virtualenv in CI: .ci/run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

# One GiB of KV cache per engine (vLLM's CPU default takes a share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from solopo_kernels.data.backends import (  # noqa: E402
    OpenAIBackend,
    SamplingServerError,
    load_backend,
    parse_vllm_args,
    prompt_seed,
)
from solopo_kernels.data.contexts import TargetLengths, build_contexts  # noqa: E402
from solopo_kernels.data.sampler import SamplingConfig, sample_pairs  # noqa: E402

from .conftest import (  # noqa: E402
    REAL_SAMPLING,
    biography_contexts,
    check_pairs_a_user_would_accept,
    read_jsonl,
    save_tiny_model,
    write_jsonl,
)

pytestmark = pytest.mark.vllm

# The "uni" executor runs the model in the engine's process instead of a worker process of its
# own: one process start (and vLLM import) less per engine, which CI time notices.
ENGINE = ["max_model_len=1024", "enforce_eager=true", "distributed_executor_backend=uni"]
# One prompt per batch: many batches, so that the SIGKILL below lands in the middle of the run.
# keep_truncated: the random tiny model never stops, so max_new_tokens cuts every sample.
CONFIG = SamplingConfig(
    num_samples=4,
    temperature=1.0,
    max_new_tokens=12,
    batch_size=1,
    include_gold=True,
    keep_truncated=True,
)
SERVER_READY_S = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tok):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tok)


@pytest.fixture(scope="module")
def engine(model_dir):
    """The offline engine, built as ``--backend vllm --dtype float32 --vllm-arg ...`` builds it.

    Its engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set only while it
    is built): about 20 s faster to start on 2 cores. The command-line runs below keep vLLM's
    default, a spawned engine process.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return load_backend(
            "vllm", str(model_dir), None, dtype="float32", vllm_args=parse_vllm_args(ENGINE)
        )
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory, examples, tiny_tok):
    rows = build_contexts(examples[:12], tiny_tok, TargetLengths.parse("300,600"), progress=False)
    return write_jsonl(tmp_path_factory.mktemp("contexts") / "contexts.jsonl", rows), rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, engine, contexts, tiny_tok, model_dir):
    """An uninterrupted in-process run with the settings that the command line records."""
    path, rows = contexts
    output = tmp_path_factory.mktemp("reference") / "pairs.jsonl"
    settings = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "judge": "sub-em after 'answer is'",
    }
    sample_pairs(rows, engine, tiny_tok, output, config=CONFIG, settings=settings, progress=False)
    return output


def ids_of(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_engine_options_reach_the_engine(engine):
    config = engine.llm.llm_engine.vllm_config
    assert config.model_config.max_model_len == 1024
    assert config.model_config.enforce_eager is True
    with pytest.raises(ValueError, match=r"no engine option 'max_model_lenn'.*max_model_len"):
        load_backend("vllm", "unused", None, vllm_args={"max_model_lenn": 5})
    with pytest.raises(ValueError, match="--dtype"):
        load_backend("vllm", "unused", None, vllm_args={"dtype": "float16"})


def test_samples_of_identical_prompts_are_independent(engine, tiny_tok):
    # Six identical prompts (six examples), four samples each at temperature 1. With
    # consecutive per-prompt seeds, vLLM (which seeds sample j with seed + j) gave 9 distinct
    # texts of 24: each prompt's first three samples were the previous prompt's last three.
    ids = ids_of(tiny_tok, "Which country is Warsaw the capital of? Answer:")
    seeds = [prompt_seed(0, f"same-{i}") for i in range(6)]
    options = dict(num_samples=4, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    out = engine.generate([ids] * 6, prompt_seeds=seeds, **options)
    texts = [text for sample in out.texts for text in sample]
    assert len(texts) == 24 and len(set(texts)) == 24
    assert out.prompt_tokens == 6 * len(ids) and 0 < out.generated_tokens <= 24 * 12

    # The same seeds give the same samples; and one n=1 request per sample with seed s + j is
    # what vLLM itself does with one request of n samples and seed s.
    assert engine.generate([ids] * 6, prompt_seeds=seeds, **options).texts == out.texts
    from vllm import SamplingParams

    params = SamplingParams(n=4, seed=seeds[2], temperature=1.0, max_tokens=12)
    [whole] = engine.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [sample.text for sample in whole.outputs] == out.texts[2]


def run_cli(model_dir, contexts_path, output, *, in_process_engine=False):
    command = [sys.executable, "-m", "solopo_kernels.data", "sample-pairs"]
    command += ["--input", str(contexts_path), "--output", str(output), "--quiet"]
    command += ["--model", str(model_dir), "--backend", "vllm", "--dtype", "float32"]
    command += ["--num-samples", "4", "--temperature", "1.0", "--max-new-tokens", "12"]
    command += ["--batch-size", "1", "--include-gold", "--keep-truncated"]
    command += [part for option in ENGINE for part in ("--vllm-arg", option)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    if in_process_engine:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # A session of its own, so that SIGKILL takes the engine's processes down with it.
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_cli_killed_and_rerun_writes_the_uninterrupted_output(
    tmp_path, model_dir, contexts, reference
):
    path, rows = contexts
    output = tmp_path / "pairs.jsonl"
    progress = tmp_path / "pairs.jsonl.progress"
    process = run_cli(model_dir, path, output)
    deadline = time.monotonic() + 300
    # SIGKILL once two examples are recorded (the header line plus two records).
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    log = process.communicate(timeout=60)[0]
    assert process.returncode == -signal.SIGKILL, log[-3000:]
    done = len(progress.read_text().splitlines()) - 1
    assert 2 <= done < len(rows), "the run was not stopped in the middle"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the spawned engine process went down with it
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the killed run are still alive")

    # The rerun keeps its engine in its own process (about 20 s less to start): the killed run
    # above had vLLM's default spawned engine.
    rerun = run_cli(model_dir, path, output, in_process_engine=True)
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log[-3000:]
    assert f"({done} of {len(rows)} were already done)" in log
    # Another engine, the same seeds: byte for byte the in-process run's rows and records.
    assert output.read_text() == reference.read_text()
    assert progress.read_text() == reference.with_name("pairs.jsonl.progress").read_text()
    assert len(read_jsonl(output)) == len(rows)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``vllm serve`` of the tiny model on 127.0.0.1 (a free port), stopped after the module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    # `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI looks up the version of a
    # distribution named "vllm"); this module starts the same server.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    command += ["--max-model-len", "1024", "--enforce-eager", "--served-model-name", "tiny"]
    # As the offline backend does on the CPU (see VLLMBackend): vllm-cpu fails on seeded
    # requests whose prefill it splits.
    command += ["--distributed-executor-backend", "uni", "--no-enable-chunked-prefill"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_READY_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"vllm serve exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vllm serve not ready in {SERVER_READY_S} s:\n{log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM ``process``'s session (the server and its engine), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_server_samples_match_the_offline_engine(server, engine, tiny_tok):
    ids = ids_of(tiny_tok, "Which country is Warsaw the capital of? Answer:")
    seeds = [prompt_seed(0, f"same-{i}") for i in range(3)]
    options = dict(num_samples=4, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=0)
    offline = engine.generate([ids] * 3, prompt_seeds=seeds, **options)
    per_sample = OpenAIBackend(server, "tiny", concurrency=4)
    served = per_sample.generate([ids] * 3, prompt_seeds=seeds, **options)
    assert served.texts == offline.texts
    assert served.generated_tokens == offline.generated_tokens
    per_prompt = OpenAIBackend(server, "tiny", requests="per-prompt")
    assert per_prompt.generate([ids] * 3, prompt_seeds=seeds, **options).texts == offline.texts
    top_k = {**options, "top_k": 5}
    assert per_sample.generate([ids], prompt_seeds=seeds[:1], **top_k).texts != offline.texts[:1]


def test_server_pairs_match_the_offline_run(server, tmp_path, contexts, tiny_tok, reference):
    _, rows = contexts
    output = tmp_path / "pairs.jsonl"
    sample_pairs(
        rows, OpenAIBackend(server, "tiny"), tiny_tok, output, config=CONFIG, progress=False
    )
    assert output.read_text() == reference.read_text()


def test_server_errors(server):
    with pytest.raises(SamplingServerError, match=r"does not serve model 'other'.*'tiny'"):
        OpenAIBackend(server, "other")
    backend = OpenAIBackend(server, "tiny", max_retries=0)
    options = dict(num_samples=1, temperature=1.0, top_p=1.0, top_k=0, seed=0, prompt_seeds=[1])
    # More new tokens than the model's context: vLLM refuses the parameter with HTTP 400.
    with pytest.raises(SamplingServerError, match=r"refused the request .*HTTP 400"):
        backend.generate([[5, 6]], max_new_tokens=5000, **options)


def test_sample_pairs_on_smollm2_with_vllm(smollm2_folder, tmp_path):
    """The converted folder on vLLM's CPU engine: pairs a user would accept, as on transformers
    (tests/data/test_data_real_models.py)."""
    from transformers import AutoTokenizer

    contexts = biography_contexts(smollm2_folder, tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    command = [sys.executable, "-m", "solopo_kernels.data", "sample-pairs", "--quiet"]
    command += ["--input", str(contexts), "--output", str(pairs), "--model", str(smollm2_folder)]
    command += ["--backend", "vllm", "--dtype", "float32", *REAL_SAMPLING, "--limit", "3"]
    command += [part for option in ENGINE for part in ("--vllm-arg", option)]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the command's process: faster
    }
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "pairs written in total" in run.stdout
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    check_pairs_a_user_would_accept(read_jsonl(pairs), tokenizer, max_new_tokens=24)
