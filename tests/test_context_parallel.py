"""Context-parallel helpers in one process: shard layouts (both orders, padding), label shifting,
the gradient scale, and the errors. The multi-process behaviour (loss and gradients equal to one
process) is tests/test_context_parallel_distributed.py."""

from __future__ import annotations

import pytest
import torch

from solopo_kernels import context_parallel as cp
from solopo_kernels import fused_solopo_loss, solopo_loss


@pytest.mark.parametrize("order", cp.SHARD_ORDERS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_slices_of_all_ranks_cover_every_position_once(order, world):
    length = cp.padded_length(37, world, order)
    assert length >= 37 and length % (world * (2 if order == "head_tail" else 1)) == 0
    slices = [cp.shard_indices(length, world, r, order) for r in range(world)]
    assert all(len(s) == length // world for s in slices)
    assert torch.equal(torch.sort(torch.cat(slices)).values, torch.arange(length))


def test_head_tail_is_the_load_balanced_order_of_pytorch_ring_attention():
    balancer = pytest.importorskip(
        "torch.distributed.tensor.experimental._context_parallel._load_balancer",
        reason="this torch has no context-parallel load balancer",
    )
    length, world = 24, 3
    torch_order = balancer._HeadTailLoadBalancer(length, world, "cpu")._generate_indices()[0]
    for rank in range(world):
        ours = cp.shard_indices(length, world, rank, "head_tail")
        assert torch.equal(ours, torch_order[rank * 8 : (rank + 1) * 8])
    assert cp.shard_indices(8, 2, 0, "head_tail").tolist() == [0, 1, 6, 7]
    assert cp.shard_indices(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]


def test_shard_sequence_pads_then_slices():
    labels = torch.arange(10).view(1, 10)
    rank1 = cp.shard_sequence(labels, 1, 4, order="contiguous", pad_value=-100)
    assert rank1.tolist() == [[3, 4, 5]]
    last = cp.shard_sequence(labels, 3, 4, order="contiguous", pad_value=-100)
    assert last.tolist() == [[9, -100, -100]]
    hidden = torch.randn(2, 5, 3)
    pieces = [cp.shard_sequence(hidden, r, 2, order="head_tail") for r in range(2)]
    assert pieces[0].shape == (2, 4, 3)
    assert torch.equal(pieces[0][:, :2], hidden[:, :2]) and torch.equal(
        pieces[1][:, :2], hidden[:, 2:4]
    )
    assert torch.equal(pieces[0][:, 3], torch.zeros(2, 3))  # padding (position 7 of 8)


def test_shift_labels_aligns_each_position_with_its_target():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])
    assert cp.shift_labels(labels).tolist() == [
        [-100, 5, 6, 7, -100],
        [3, 4, -100, -100, -100],
    ]


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    y = cp.scale_gradient(x * 3.0, 4.0)
    assert y.item() == 6.0
    y.backward()
    assert x.grad.item() == 12.0
    assert cp.scale_gradient(x, 1) is x


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: cp.shard_indices(8, 2, 0, "zigzag"), "order: expected one of"),
        (lambda: cp.shard_indices(8, 2, 2, "contiguous"), r"rank: expected an int in \[0, 2\)"),
        (lambda: cp.shard_indices(8, 0, 0, "contiguous"), "world_size: expected a positive int"),
        (lambda: cp.shard_indices(6, 2, 0, "head_tail"), "length: 6 is not a multiple of 4"),
    ],
)
def test_bad_layouts_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_group_without_torch_distributed_raises_naming_the_argument():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    logps, lengths = -torch.rand(4), torch.tensor([1, 2, 3, 4])
    with pytest.raises(
        ValueError, match="context_parallel_group: torch.distributed is not initialised"
    ):
        solopo_loss(
            logps,
            lengths,
            None,
            None,
            alpha=0.0,
            loss_type="simpo",
            context_parallel_group=object(),
        )
    weight = torch.randn(7, 3)
    hidden = torch.randn(2, 4, 3)
    labels = torch.randint(0, 7, (2, 4))
    with pytest.raises(ValueError, match="context_parallel_group"):
        fused_solopo_loss(
            weight,
            hidden,
            labels,
            None,
            None,
            alpha=0.0,
            loss_type="simpo",
            context_parallel_group=object(),
        )
