"""Padding-free packing: all sequences of a SoLoPO step in one row, so the model runs once.

A SoLoPO step has ``2B`` short sequences (prompt + chosen, prompt + rejected) and ``B`` or ``2B``
long ones. Padded, they take two forwards (the short batch and the long batch), each padded to its
longest row; with the multi-scale long contexts of ``solopo-data`` (4K next to 32K, say) padding
can double the tokens the model processes. Packed, they are concatenated into one row:

* ``input_ids`` end to end, no attention mask;
* ``position_ids`` restarting at 0 for every sequence, which is how transformers tells the
  sequences apart: with no attention mask and no cache it builds a block-diagonal causal mask
  from them for ``sdpa``/``eager``/``flex_attention``, and ``flash_attention_2``/``3`` (the
  ``flash-attn`` package, CUDA) run their varlen kernels on the sequence boundaries they imply;
* ``sequence_ids``: the index of the sequence each token belongs to, so that the fused log-prob
  kernel's per-token log-probs are summed per sequence (and the prediction from one sequence's last
  token to the next sequence's first token is never scored);
* the row's sequence boundaries as the flash-attention varlen kernels take them, computed once
  by the collator on the host: ``cu_seq_lens`` (``[0, n_1, n_1 + n_2, ...]``) and ``max_length``
  (the longest sequence), passed to the model as ``cu_seq_lens_q``/``cu_seq_lens_k`` and
  ``max_length_q``/``max_length_k``, as TRL's padding-free collator does. Without them
  transformers derives the same values from ``position_ids`` on the device, with a host sync.

Which attention to use: ``flash_attention_2``/``3`` on CUDA (attention costs the sum of the
per-sequence ``n_i^2``). ``sdpa``/``eager``/``flex_attention`` keep the sequences apart through a
block-diagonal mask that transformers builds dense, ``(1, 1, L, L)`` for a row of ``L`` tokens:
``L^2`` bytes (boolean, sdpa) or ``L^2`` elements of the model's dtype (eager), per layer call,
and no flash kernel. Right for the CPU and for tests; on CUDA the trainer warns with the size
(:func:`warn_dense_packing`).

An optional cap (``max_tokens``) splits a step into several packed rows, each run by its own
forward: a sequence is never split, consecutive sequences fill a row until the next one would pass
the cap, and a sequence longer than the cap gets a row of its own.

The packed batch is stored as ``(P, L)`` tensors (``P`` rows, padded to the longest; padding has
``sequence_id = -1`` and is cut off before the forward). Sequence order is the order given, which
for SoLoPO is: short chosen, short rejected, long chosen, long rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

PACKED_INPUT_IDS = "packed_input_ids"
PACKED_POSITION_IDS = "packed_position_ids"
PACKED_COMPLETION_MASK = "packed_completion_mask"
PACKED_SEQUENCE_IDS = "packed_sequence_ids"
PACKED_KEYS = (PACKED_INPUT_IDS, PACKED_POSITION_IDS, PACKED_COMPLETION_MASK, PACKED_SEQUENCE_IDS)
# Per packed row, host-side Python values (lists of ints survive the move of a batch to the
# device unchanged): the cumulative sequence lengths and the longest sequence of the row.
PACKED_CU_SEQ_LENS = "packed_cu_seq_lens"
PACKED_MAX_LENGTH = "packed_max_length"
# The number of preference pairs a packed batch holds (an int): the step checks its sequences
# against it (2 short + the options' long rows per pair).
PACKED_PAIRS = "packed_pairs"
# Attention implementations that build a dense (1, 1, L, L) mask for packed rows.
DENSE_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")

# Attention implementations that keep packed sequences apart when they get position_ids restarting
# at 0, no attention mask and no cache (transformers' masking utilities build the block-diagonal
# mask for the mask-based ones; the flash ones run varlen on the boundaries). Anything else (a hub
# kernel, paged attention, a custom function) may let the sequences see each other: refused.
PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class Pack:
    """One packed row, ready for a forward: the first four tensors are ``(1, n)`` (int64);
    ``cu_seq_lens`` is ``(S + 1,)`` int32 for the row's ``S`` sequences, on the row's device, and
    ``max_length`` a Python int (the keyword arguments of transformers' flash-attention path)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    sequence_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    max_length: int


def split_into_rows(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Indices of the sequences of each packed row: consecutive sequences, a new row whenever the
    next sequence would take the row past ``max_tokens`` (None: one row for all)."""
    rows: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if not rows or (max_tokens is not None and used + length > max_tokens):
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def pack_sequences(
    input_ids: Sequence[torch.Tensor],
    completion_masks: Sequence[torch.Tensor],
    *,
    pad_token_id: int,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack unpadded sequences into ``(P, L)`` rows.

    Args:
        input_ids: one ``(n_i,)`` integer tensor per sequence (no padding).
        completion_masks: one ``(n_i,)`` 0/1 tensor per sequence (1 at response tokens).
        pad_token_id: fills the rows past their end (never read by the model).
        max_tokens: optional cap on the tokens of one row (see the module docstring).
    Returns:
        ``{"packed_input_ids", "packed_position_ids", "packed_completion_mask",
        "packed_sequence_ids"}``, each ``(P, L)`` int64 (``sequence_ids`` is -1 past a row's
        end), plus ``"packed_cu_seq_lens"`` (one list of ints per row: 0 and the cumulative
        lengths of its sequences) and ``"packed_max_length"`` (one int per row: its longest
        sequence).

    Example: sequences ``[5, 6, 7]`` (response ``7``) and ``[8, 9]`` (response ``9``) give one row
    ``input_ids [[5, 6, 7, 8, 9]]``, ``position_ids [[0, 1, 2, 0, 1]]``,
    ``completion_mask [[0, 0, 1, 0, 1]]``, ``sequence_ids [[0, 0, 0, 1, 1]]``,
    ``cu_seq_lens [[0, 3, 5]]``, ``max_length [3]``.
    """
    if len(input_ids) != len(completion_masks) or not input_ids:
        raise ValueError(
            f"input_ids: expected one completion mask per sequence and at least one sequence, got "
            f"{len(input_ids)} sequences and {len(completion_masks)} masks"
        )
    lengths = [int(ids.numel()) for ids in input_ids]
    if min(lengths) == 0:
        raise ValueError(f"input_ids: sequence {lengths.index(0)} is empty")
    rows = split_into_rows(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    out = {
        PACKED_INPUT_IDS: torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        PACKED_POSITION_IDS: torch.zeros((len(rows), width), dtype=torch.long),
        PACKED_COMPLETION_MASK: torch.zeros((len(rows), width), dtype=torch.long),
        PACKED_SEQUENCE_IDS: torch.full((len(rows), width), -1, dtype=torch.long),
    }
    out[PACKED_CU_SEQ_LENS] = [[0] for _ in rows]
    out[PACKED_MAX_LENGTH] = [max(lengths[i] for i in row) for row in rows]
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            stop = start + lengths[index]
            out[PACKED_INPUT_IDS][r, start:stop] = input_ids[index]
            out[PACKED_POSITION_IDS][r, start:stop] = torch.arange(lengths[index])
            out[PACKED_COMPLETION_MASK][r, start:stop] = completion_masks[index]
            out[PACKED_SEQUENCE_IDS][r, start:stop] = index
            out[PACKED_CU_SEQ_LENS][r].append(stop)
            start = stop
    return out


def is_packed(batch: dict[str, Any]) -> bool:
    return PACKED_INPUT_IDS in batch


def count_sequences(batch: dict[str, Any]) -> int:
    """Number of sequences in a packed batch (one host sync)."""
    return int(batch[PACKED_SEQUENCE_IDS].max()) + 1


def iter_packs(batch: dict[str, Any], *, sequences: int | None = None) -> Iterator[Pack]:
    """The packed rows of ``batch``, cut to their real length (one host sync for all rows).

    With ``sequences=k`` only the tokens of sequences ``[0, k)`` are kept (a prefix of each row,
    since rows keep the sequence order); rows left empty are skipped. The reference of a dpo/ipo
    run that needs no long-input reference uses this to skip the long sequences.
    """
    sequence_ids = batch[PACKED_SEQUENCE_IDS]
    keep = sequence_ids >= 0
    if sequences is not None:
        keep &= sequence_ids < sequences
    for row, n in enumerate(keep.sum(-1).tolist()):
        if n == 0:
            continue
        # The kept tokens end on a sequence boundary: the boundaries up to n are the row's.
        bounds = [b for b in batch[PACKED_CU_SEQ_LENS][row] if b <= n]
        tensors = [batch[key][row : row + 1, :n] for key in PACKED_KEYS]
        cu_seq_lens = torch.tensor(bounds, dtype=torch.int32, device=sequence_ids.device)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        yield Pack(*tensors, cu_seq_lens=cu_seq_lens, max_length=longest)


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation of a transformers model (PEFT-wrapped or not)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "_attn_implementation", None)


def check_packing_attention(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless ``model``'s attention keeps packed sequences apart."""
    implementation = attention_implementation(model)
    if implementation not in PACKING_ATTENTION:
        raise ValueError(
            f"padding_free: the model's attn_implementation={implementation!r} is not known to keep "
            "packed sequences apart (they could attend to each other and train on wrong log-probs). "
            "Load the model with attn_implementation='flash_attention_2' (CUDA, the flash-attn "
            "package), 'sdpa' or 'eager', or set padding_free=False"
        )


def warn_dense_packing(
    model: torch.nn.Module, device: torch.device, max_packed_length: int | None
) -> None:
    """On CUDA, warn once that ``model``'s attention packs through a dense mask, with its size,
    and name the fix (``attn_implementation="flash_attention_2"``)."""
    implementation = attention_implementation(model)
    if torch.device(device).type != "cuda" or implementation not in DENSE_MASK_ATTENTION:
        return
    size = "L^2 bytes (L: the tokens of the packed row" + (
        f", at most max_packed_length={max_packed_length}: {max_packed_length**2 / 2**30:.2f} GiB)"
        if max_packed_length
        else ", the whole step: 32K tokens is 1 GiB, 128K is 16 GiB)"
    )
    logger.warning(
        "padding_free: attn_implementation=%r keeps the packed sequences apart with a dense "
        "(1, 1, L, L) block-diagonal mask (%s%s) and attention over all L^2 positions, without a "
        "flash kernel. On CUDA load the model with attn_implementation='flash_attention_2' (the "
        "flash-attn package): varlen kernels on the sequence boundaries, no mask.",
        implementation,
        size,
        "; eager keeps it in the model's dtype" if implementation == "eager" else "",
    )
