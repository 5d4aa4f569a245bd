"""The opt-in kernel knobs and the per-call geometry shared by the backends
(``solopo_kernels.ops.tiles``): option checks, how many columns a saved-logits budget buys, and
tiles that never straddle the saved edge."""

from __future__ import annotations

import pytest
import torch

from solopo_kernels import fused_linear_logprobs
from solopo_kernels.ops import KernelOptions
from solopo_kernels.ops.tiles import (
    DEFAULT_SAVED_LOGITS_BYTES,
    SAVED_COLUMNS_ALIGN,
    Tiles,
    check_kernel_options,
    saved_columns,
    vocab_bounds,
)


def test_kernel_options_and_every_public_name_resolve_at_the_top_level():
    import solopo_kernels

    assert solopo_kernels.KernelOptions is KernelOptions
    for name in solopo_kernels.__all__:
        assert getattr(solopo_kernels, name) is not None, name


def test_kernel_options_default_to_a_bounded_saved_logits_budget():
    assert KernelOptions().saved_logits_bytes == DEFAULT_SAVED_LOGITS_BYTES == 256 << 20
    assert KernelOptions().skip_threshold == 0.0  # exact
    assert check_kernel_options(None) == KernelOptions()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB", None])
def test_kernel_options_reject_bad_budgets(bad):
    with pytest.raises(ValueError, match="saved_logits_bytes"):
        KernelOptions(saved_logits_bytes=bad)


def test_kernel_options_must_be_the_options_object():
    with pytest.raises(TypeError, match="kernel_options: expected"):
        check_kernel_options({"saved_logits_bytes": 1})
    with pytest.raises(TypeError, match="kernel_options"):
        fused_linear_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), kernel_options=1024
        )


@pytest.mark.parametrize(
    "budget, n_rows, vocab, expected",
    [
        (0, 100, 1000, 0),
        (4 * 100 * 1000, 100, 1000, 1000),  # exactly N x V float32: everything
        (10**12, 100, 1000, 1000),
        (4 * 100 * 1000 - 1, 100, 1000, 960),  # one byte short: whole 64-column blocks
        (4 * 100 * 63, 100, 1000, 0),  # less than one block
        (4 * 100 * 200, 100, 1000, 192),
        (5, 0, 1000, 0),  # no rows
    ],
)
def test_saved_columns_fit_the_budget(budget, n_rows, vocab, expected):
    columns = saved_columns(budget, n_rows, vocab)
    assert columns == expected
    assert 4 * n_rows * columns <= budget
    assert columns == vocab or columns % SAVED_COLUMNS_ALIGN == 0


@pytest.mark.parametrize("saved", [0, 40, 64, 100, 150])
def test_vocabulary_tiles_never_straddle_the_saved_edge(saved):
    bounds = vocab_bounds(Tiles(8, 32, saved_columns=saved), 150, 32)
    assert bounds[0][0] == 0 and bounds[-1][1] == 150
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))  # contiguous
    assert all(0 < hi - lo <= 32 for lo, hi in bounds)
    assert all(hi <= saved or lo >= saved for lo, hi in bounds)
