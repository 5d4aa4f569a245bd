"""Generation backends behind one protocol (:class:`GenerationBackend`), and
:func:`load_backend`, the one place that picks and builds one by name.

* ``transformers``: ``model.generate`` (:class:`TransformersBackend`);
* ``vllm``: vLLM's offline engine (:class:`VLLMBackend`);
* ``openai``: an OpenAI-compatible completions server such as ``vllm serve``
  (:class:`OpenAIBackend`).

torch, transformers, vllm and openai are imported only when a backend is built or used.
``sample-pairs`` (:mod:`solopo_kernels.data.sampler`) drives them; any other command can too,
without importing the sampler.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Literal

from .base import SEED_BITS, Generation, GenerationBackend, check_prompt_seeds, prompt_seed
from .openai_backend import OpenAIBackend, SamplingServerError
from .transformers_backend import TransformersBackend
from .vllm_backend import VLLMBackend, check_vllm_args, parse_vllm_args

BackendName = Literal["auto", "transformers", "vllm", "openai"]

__all__ = [
    "SEED_BITS",
    "BackendName",
    "Generation",
    "GenerationBackend",
    "OpenAIBackend",
    "SamplingServerError",
    "TransformersBackend",
    "VLLMBackend",
    "check_prompt_seeds",
    "check_vllm_args",
    "load_backend",
    "parse_vllm_args",
    "prompt_seed",
]


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
