"""The OpenAI-compatible server backend against a small local fake server: the requests it
sends (token-id prompts, per-sample seeds), retries with backoff, timeouts, and its errors when
the server is unreachable, refuses a parameter or does not serve the model; resuming after a
server failure. (The same backend against a real ``vllm serve``: test_data_vllm.py.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from solopo_kernels.data.backends import (  # noqa: E402
    OpenAIBackend,
    SamplingServerError,
    load_backend,
    prompt_seed,
)
from solopo_kernels.data.cli import main  # noqa: E402
from solopo_kernels.data.sampler import SamplingConfig, sample_pairs  # noqa: E402

from .conftest import read_jsonl, write_jsonl  # noqa: E402

OPTIONS = dict(max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=0, seed=0)


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 that speaks enough of the OpenAI completions API.

    Each completion's text is ``"seed=<seed> prompt=<first token id>"``, cut by ``max_tokens``
    (finish reason ``"length"``) for odd seeds and finished for even ones. ``script`` is a list
    of HTTP statuses (or ``"slow"``) that the next completion requests get, in order, before
    the server answers normally; every request body is kept in ``requests``.
    """

    def __init__(self, models=("tiny",)):
        self.models = list(models)
        self.script: list = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def reply(self, status, payload, headers=()):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/models"):
                    data = [{"id": name, "object": "model"} for name in fake.models]
                    self.reply(200, {"object": "list", "data": data})
                else:
                    self.reply(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(request)
                    step = fake.script.pop(0) if fake.script else 200
                if step == "slow":
                    time.sleep(1.5)
                    step = 200
                if step == 400:
                    message = "max_tokens is too large for this model"
                    self.reply(400, {"error": {"message": message, "type": "BadRequestError"}})
                    return
                if step != 200:
                    # retry-after-ms keeps the client's backoff short in tests.
                    self.reply(step, {"error": {"message": "busy"}}, [("retry-after-ms", "5")])
                    return
                n = request.get("n", 1)
                choices = [
                    {
                        "index": j,
                        "text": f"seed={request['seed'] + j} prompt={request['prompt'][0]}",
                        "finish_reason": "length" if (request["seed"] + j) % 2 else "stop",
                    }
                    for j in range(n)
                ]
                usage = {
                    "prompt_tokens": len(request["prompt"]),
                    "completion_tokens": 2 * n,
                    "total_tokens": len(request["prompt"]) + 2 * n,
                }
                self.reply(
                    200,
                    {
                        "id": "c",
                        "object": "text_completion",
                        "created": 0,
                        "model": request["model"],
                        "choices": choices,
                        "usage": usage,
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def closed_port_url() -> str:
    """The URL of a port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_requests_carry_token_ids_and_per_sample_seeds(fake):
    backend = OpenAIBackend(fake.url, "tiny", max_retries=0, concurrency=3)
    out = backend.generate([[5, 6, 7], [8, 9]], num_samples=3, prompt_seeds=[100, 2000], **OPTIONS)
    # Sample j of prompt i is seeded prompt_seeds[i] + j, in order whatever the answer order.
    assert out.texts == [
        [f"seed={100 + j} prompt=5" for j in range(3)],
        [f"seed={2000 + j} prompt=8" for j in range(3)],
    ]
    assert (out.prompt_tokens, out.generated_tokens) == (5, 12)
    assert out.truncated == [[j % 2 == 1 for j in range(3)]] * 2  # finish_reason "length"
    assert len(fake.requests) == 6
    for request in fake.requests:
        assert request["n"] == 1 and request["model"] == "tiny"
        assert (request["max_tokens"], request["temperature"], request["top_p"]) == (5, 1.0, 0.9)
        assert "top_k" not in request  # top_k=0 (off) is not sent: not every server takes it
    assert sorted(tuple(r["prompt"]) for r in fake.requests) == [(5, 6, 7)] * 3 + [(8, 9)] * 3

    fake.requests.clear()
    per_prompt = OpenAIBackend(fake.url, "tiny", requests="per-prompt")
    again = per_prompt.generate(
        [[5, 6, 7], [8, 9]], num_samples=3, prompt_seeds=[100, 2000], **{**OPTIONS, "top_k": 4}
    )
    assert again.texts == out.texts  # the fake, like vLLM, seeds sample j with seed + j
    # Requests are concurrent: compare them in any order of arrival.
    assert sorted((r["n"], r["seed"], r["top_k"]) for r in fake.requests) == [
        (3, 100, 4),
        (3, 2000, 4),
    ]


def test_retries_with_backoff_then_succeeds(fake):
    fake.script = [503, 429]
    backend = OpenAIBackend(fake.url, "tiny", max_retries=2)
    out = backend.generate([[1]], num_samples=1, prompt_seeds=[7], **OPTIONS)
    assert out.texts == [["seed=7 prompt=1"]]
    assert len(fake.requests) == 3  # two refusals, then the answer


def test_gives_up_after_max_retries(fake):
    fake.script = [503] * 10
    backend = OpenAIBackend(fake.url, "tiny", max_retries=2)
    with pytest.raises(SamplingServerError, match=r"failed \(a completion request .*HTTP 503"):
        backend.generate([[1]], num_samples=1, prompt_seeds=[7], **OPTIONS)
    assert len(fake.requests) == 3


def test_refused_parameter_is_reported_without_retrying(fake):
    fake.script = [400]
    backend = OpenAIBackend(fake.url, "tiny", max_retries=3)
    with pytest.raises(SamplingServerError) as caught:
        backend.generate([[1]], num_samples=1, prompt_seeds=[7], **OPTIONS)
    message = str(caught.value)
    assert "refused the request" in message and "HTTP 400" in message
    assert "max_tokens is too large for this model" in message and "'max_tokens': 5" in message
    assert len(fake.requests) == 1


def test_timeout_is_bounded(fake):
    fake.script = ["slow", "slow"]
    backend = OpenAIBackend(fake.url, "tiny", timeout=0.3, max_retries=1)
    began = time.monotonic()
    with pytest.raises(SamplingServerError, match=r"cannot reach .*APITimeoutError.*0.3 s timeout"):
        backend.generate([[1]], num_samples=1, prompt_seeds=[7], **OPTIONS)
    assert time.monotonic() - began < 1.4  # two 0.3 s attempts and a backoff, not a 1.5 s wait
    assert len(fake.requests) == 2


def test_unreachable_server_and_unknown_model(fake):
    with pytest.raises(SamplingServerError, match=r"cannot reach .*is the server running"):
        OpenAIBackend(closed_port_url(), "tiny", max_retries=1)
    with pytest.raises(SamplingServerError, match=r"does not serve model 'other'.*'tiny'"):
        OpenAIBackend(fake.url, "other")
    for bad, match in [
        ({"base_url": "127.0.0.1:8000"}, "base_url"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"concurrency": 0}, "concurrency"),
        ({"requests": "batch"}, "requests"),
    ]:
        with pytest.raises(ValueError, match=match):
            OpenAIBackend(**{"base_url": fake.url, "model": "tiny", **bad})
    with pytest.raises(ValueError, match="prompt_seeds"):
        OpenAIBackend(fake.url, "tiny").generate(
            [[1], [2]], num_samples=1, prompt_seeds=[7], **OPTIONS
        )
    with pytest.raises(ValueError, match="base_url"):
        load_backend("openai", "tiny", None)


def rows(n):
    return [
        {
            "id": f"r{i}",
            "prompt": f"Question {i}? Answer:",
            "long_prompt": f"Filler. Question {i}? Answer:",
            "answers": ["Poland"],
        }
        for i in range(n)
    ]


def test_resumes_after_a_server_failure(fake, tmp_path, tiny_tok):
    config = SamplingConfig(num_samples=2, max_new_tokens=4, batch_size=2, include_gold=True)
    full = tmp_path / "full.jsonl"
    backend = OpenAIBackend(fake.url, "tiny", max_retries=0)
    sample_pairs(rows(6), backend, tiny_tok, full, config=config, progress=False)
    assert len(read_jsonl(full)) == 6
    first_id = read_jsonl(full)[0]["id"]
    # The rejected response is the first finished sample: odd seeds come back cut.
    seed = prompt_seed(0, first_id)
    assert read_jsonl(full)[0]["rejected"].startswith(f"seed={seed + seed % 2} ")
    assert read_jsonl(full)[0]["metadata"]["num_truncated"] == 1

    # Batch 0 is answered (2 prompts x 2 samples), then the server refuses a request.
    fake.script = [200] * 4 + [400]
    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(SamplingServerError, match="refused"):
        sample_pairs(rows(6), backend, tiny_tok, resumed, config=config, progress=False)
    assert len(read_jsonl(resumed)) == 2
    summary = sample_pairs(rows(6), backend, tiny_tok, resumed, config=config, progress=False)
    assert (summary.already_done, summary.processed) == (2, 4)
    assert resumed.read_text() == full.read_text()
    assert (tmp_path / "resumed.jsonl.progress").read_text() == (
        tmp_path / "full.jsonl.progress"
    ).read_text()


def test_cli_openai_backend(fake, tmp_path, tiny_tok, capsys):
    tiny_tok.save_pretrained(tmp_path / "tok")
    contexts = write_jsonl(tmp_path / "contexts.jsonl", rows(3))
    output = tmp_path / "pairs.jsonl"
    common = ["sample-pairs", "--input", str(contexts), "--output", str(output), "--quiet"]
    common += ["--model", "tiny-served", "--tokenizer", str(tmp_path / "tok"), "--backend"]
    common += ["openai", "--num-samples", "2", "--include-gold", "--max-retries", "0"]
    assert main([*common, "--base-url", closed_port_url()]) == 1
    assert "cannot reach the OpenAI-compatible server" in capsys.readouterr().err

    fake.models = ["tiny-served"]
    assert main([*common, "--base-url", fake.url, "--concurrency", "2"]) == 0
    pairs = read_jsonl(output)
    assert [pair["id"] for pair in pairs] == ["r0", "r1", "r2"]
    assert all(pair["rejected"].startswith("seed=") for pair in pairs)
    assert len(fake.requests) == 6 and all(request["n"] == 1 for request in fake.requests)

    assert main([*common[:-6], "transformers", "--base-url", fake.url]) == 2
    assert "--base-url: only the openai backend" in capsys.readouterr().err
    assert main([*common[:-6], "openai"]) == 2
    assert "--base-url: the openai backend needs" in capsys.readouterr().err
