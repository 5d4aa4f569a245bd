"""The ``openai`` backend: completions from an OpenAI-compatible server (``vllm serve``,
SGLang, ...)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from .base import Generation, check_prompt_seeds


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
        check_prompt_seeds(prompt_ids, prompt_seeds)
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
        truncated: list[list[bool]] = [[] for _ in prompt_ids]
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
                    # The completions API's finish reasons: "stop", "length" (max_tokens), ...
                    truncated[i] += [choice.finish_reason == "length" for choice in choices]
                    if response.usage is not None:
                        generated += response.usage.completion_tokens
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return Generation(texts, sum(map(len, prompt_ids)), generated, truncated=truncated)
