"""The ``transformers`` backend: ``model.generate`` on one left-padded batch per call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Generation


class TransformersBackend:
    """``model.generate`` of a ``transformers`` causal LM, one left-padded batch per call.

    Note that ``generate`` repeats each prompt ``num_samples`` times, so the prompt is processed
    ``num_samples`` times (no prefix sharing, unlike vLLM). Every sample of the batch comes from
    one torch generator seeded with ``seed``, so samples are independent without
    ``prompt_seeds`` (accepted and unused). ``temperature=0`` decodes greedily (``evaluate``).
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
        # temperature 0 is greedy decoding, as on vLLM and OpenAI-compatible servers (generate
        # itself rejects a zero temperature when sampling)
        if temperature == 0:
            decoding: dict[str, Any] = {"do_sample": False}
        else:
            decoding = {
                "do_sample": True,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
            }
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                **decoding,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
            )
        stop_ids = self.model.generation_config.eos_token_id
        stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids]) - {None}
        texts: list[list[str]] = [[] for _ in prompt_ids]
        truncated: list[list[bool]] = [[] for _ in prompt_ids]
        generated = 0
        for row, tokens in enumerate(output[:, width:].tolist()):
            end = next((i + 1 for i, token in enumerate(tokens) if token in stop_ids), None)
            # generate stops early only once every row has stopped: a row without a stop token
            # ran to max_new_tokens.
            truncated[row // num_samples].append(end is None)
            end = len(tokens) if end is None else end
            generated += end
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            texts[row // num_samples].append(text)
        # generate repeats every prompt per sample and has no cache across rows: nothing cached.
        return Generation(
            texts, sum(map(len, prompt_ids)), generated, cached_prompt_tokens=0, truncated=truncated
        )
