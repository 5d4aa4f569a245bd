"""The memory and FLOP budgets of docs/kernels.md, checked deterministically: allocation sizes and matmul FLOPs.

The strict minimal-memory kernels (``KernelOptions(saved_logits_bytes=0)``): no allocation past
the tile budget, ``8 N H V`` FLOPs whatever ``T``. The default (a bounded saved-logits budget):
a small step keeps all its logits and runs at ``6 N H V``; a large one keeps what fits, and its
peak stays within the budget of the strict kernels' peak. Each check is also run on a
materialising implementation to show it would fail there.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from solopo_kernels import KernelOptions, fused_linear_logprobs
from solopo_kernels.ops.tiles import DEFAULT_SAVED_LOGITS_BYTES
from tests import reference
from tests.inputs import IGNORE, Head
from tests.instruments import AllocationRecorder


def _long_batch(tokens_per_row: int, response_per_row: int, vocab: int, hidden: int):
    """Two rows of ``tokens_per_row`` positions, each ending in ``response_per_row`` response tokens."""
    labels = torch.full((2, tokens_per_row), IGNORE)
    labels[:, -response_per_row:] = torch.randint(0, vocab, (2, response_per_row))
    h = torch.randn(2, tokens_per_row, hidden, requires_grad=True)
    return h, labels


def _forward_backward(fn, hidden, head, labels):
    out = fn(hidden, head.weight, labels, head.bias)
    (out * torch.randn(labels.shape)).sum().backward()


# N = 2048 response tokens out of T = 4096, V = 8192: N x V is 50x the tile budget.
VOCAB, HIDDEN, T_ROW, N_ROW = 8192, 32, 2048, 1024
BUDGET = 2 * N_ROW * VOCAB // 50
TILES = (256, 1024)  # 262,144 elements <= BUDGET
STRICT = KernelOptions(saved_logits_bytes=0)


def test_no_allocation_exceeds_the_tile_budget():
    head = Head.random(VOCAB, HIDDEN, bias=True)
    hidden, labels = _long_batch(T_ROW, N_ROW, VOCAB, HIDDEN)
    assert TILES[0] * TILES[1] <= BUDGET and 2 * N_ROW * VOCAB >= 50 * BUDGET
    with AllocationRecorder() as rec:
        _forward_backward(
            lambda h, w, y, b: fused_linear_logprobs(
                h, w, y, b, chunk_size=TILES, backend="torch", kernel_options=STRICT
            ),
            hidden,
            head,
            labels,
        )
    size, op = rec.largest
    assert size <= BUDGET, f"{op} allocated {size} elements > budget {BUDGET}"
    assert hidden.grad is not None and head.weight.grad is not None and head.bias.grad is not None


def test_allocation_recorder_catches_a_materialising_implementation():
    head = Head.random(VOCAB, HIDDEN, bias=True)
    hidden, labels = _long_batch(T_ROW, N_ROW, VOCAB, HIDDEN)
    with AllocationRecorder() as rec:
        _forward_backward(reference.token_logps, hidden, head, labels)
    assert rec.largest[0] >= 2 * T_ROW * VOCAB > BUDGET


def _addmm_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


def _matmul_flops(fn, tokens_per_row: int, response_per_row: int, vocab=512, hidden=16) -> int:
    head = Head.random(vocab, hidden, bias=False)
    hidden_states, labels = _long_batch(tokens_per_row, response_per_row, vocab, hidden)
    # The stock counter knows out-of-place addmm only; in-place accumulation does the same work.
    in_place = {torch.ops.aten.addmm_: _addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        _forward_backward(fn, hidden_states, head, labels)
    return counter.get_total_flops()


def test_flops_scale_with_response_tokens_not_positions():
    def ours(h, w, y, b):
        return fused_linear_logprobs(
            h, w, y, b, chunk_size=(64, 128), backend="torch", kernel_options=STRICT
        )

    n, vocab, hidden = 2 * 100, 512, 16
    short = _matmul_flops(ours, 200, 100)
    long = _matmul_flops(ours, 3200, 100)  # 16x the positions, same response tokens
    assert short == long == 8 * n * hidden * vocab  # 8 N H V, forward + backward
    # With twice the response tokens the work doubles.
    assert _matmul_flops(ours, 200, 200) == 2 * short


def test_flop_counter_catches_work_on_prompt_positions():
    plain_short = _matmul_flops(reference.token_logps, 200, 100)
    plain_long = _matmul_flops(reference.token_logps, 3200, 100)
    assert plain_long == 16 * plain_short


def test_the_default_keeps_a_small_steps_logits_and_runs_at_6_nhv():
    def ours(h, w, y, b):
        return fused_linear_logprobs(h, w, y, b, chunk_size=(64, 128), backend="torch")

    n, vocab, hidden = 2 * 100, 512, 16
    assert 4 * n * vocab <= DEFAULT_SAVED_LOGITS_BYTES
    assert _matmul_flops(ours, 200, 100) == 6 * n * hidden * vocab
    assert _matmul_flops(ours, 3200, 100) == 6 * n * hidden * vocab


def test_the_default_budget_bounds_a_large_steps_extra_memory():
    """N x V float32 logits of 320 MiB, over the 256 MiB default: the forward keeps what fits
    (whole 64-column blocks), the rest is recomputed, and the peak of live allocations stays
    within the budget of the strict kernels' peak. H = 8 keeps the GEMMs cheap."""
    vocab, hidden, n_rows = 81920, 8, 1024
    assert 4 * n_rows * vocab > DEFAULT_SAVED_LOGITS_BYTES
    head = Head.random(vocab, hidden, bias=False)
    rows = torch.randn(n_rows, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (n_rows,))

    def peak(options):
        with AllocationRecorder() as rec:
            out = fused_linear_logprobs(rows, head.weight, labels, backend="torch", kernel_options=options)
            out.sum().backward()
        rows.grad = head.weight.grad = None
        return rec

    strict, default = peak(STRICT), peak(None)
    extra = default.peak_live_bytes - strict.peak_live_bytes
    assert 0 < extra <= DEFAULT_SAVED_LOGITS_BYTES
    columns = DEFAULT_SAVED_LOGITS_BYTES // (4 * n_rows) // 64 * 64  # whole 64-column blocks
    assert 0 < columns < vocab
    assert ("aten.empty.memory_format", torch.float32, (n_rows * columns,)) in default.allocations
    assert not any(math.prod(s) == n_rows * columns for _, _, s in strict.allocations)
