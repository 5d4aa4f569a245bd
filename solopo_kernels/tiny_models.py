"""Tiny models and tokenizers built in code: the ``tiny`` demo of ``solopo-data``, and the model
and tokenizer of the tests, examples and benchmarks.

Nothing here touches a model hub: the tokenizer is a ``tokenizers`` WordLevel model over a word
list you pass, and the model is a randomly initialised ``transformers`` Llama. Requires the
``trl`` or ``data`` extra (``transformers`` and ``tokenizers``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>")
PUNCTUATION = tuple(".,?!:;'\"()-")

# A minimal chat template: one line per turn, with a generation marker so that chat-format
# prompts end where the assistant's answer starts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end|> "
    "{% elif message['role'] == 'system' %}{{ message['content'] }} <|end|> "
    "{% else %}<|assistant|> {% generation %}{{ message['content'] }} <|end|>{% endgeneration %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(words: Iterable[str], *, lowercase: bool = True) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus special tokens and punctuation.

    Words are split on whitespace and punctuation; unknown words map to ``<unk>``. Prompt tokens
    are always an exact prefix of prompt+completion tokens, which keeps TRL's prompt/completion
    split exact.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *PUNCTUATION, *words):
        token = token.lower() if lowercase and token not in SPECIAL_TOKENS else token
        if token and token not in vocab:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    tokenizer: Any,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` sized for CPU tests (23k parameters by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
