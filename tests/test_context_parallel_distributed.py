"""Context parallelism on gloo (2 and 4 CPU processes): every row split along its length over the
group gives the loss of one process (to 1e-6), each rank's hidden-state gradients are its slices
of the unsplit ones and the lm_head gradients summed over the ranks are the unsplit ones (to
1e-5), for every loss type, both shard orders, odd lengths (padding), responses that cross slice
boundaries and rows with no response token on some ranks; through ``fused_solopo_loss`` and
through the per-sequence-sum path (``solopo_loss``). A row with no response token on any rank
raises the same ValueError on every rank.

One spawn per group size runs every case (process start-up dominates on 2 cores).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from solopo_kernels import context_parallel as cp
from solopo_kernels import fused_linear_logprobs, fused_solopo_loss, solopo_loss
from tests import reference
from tests.inputs import IGNORE

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]

LOSS_TYPES = ("dpo", "ipo", "simpo", "orpo", "cpo")
PAIRS, SHORT, LONG, HIDDEN, VOCAB = 2, 13, 29, 8, 37  # odd lengths: both orders pad


def _labels(
    rows: int, length: int, spans: list[tuple[int, int]], g: torch.Generator
) -> torch.Tensor:
    labels = torch.full((rows, length), IGNORE, dtype=torch.long)
    for row, (start, stop) in enumerate(spans):
        labels[row, start:stop] = torch.randint(0, VOCAB, (stop - start,), generator=g)
    return labels


def _case(loss_type: str, ra_target: str, seed: int) -> dict:
    """Full (unsplit) inputs, already shifted. Spans: responses across every slice boundary, one
    response of 2 tokens that lies in a single slice (no response token on the other ranks)."""
    g = torch.Generator().manual_seed(seed)
    n_long = PAIRS * (2 if ra_target == "both" else 1)
    short_spans = [(3, 12), (0, 2), (5, 13), (10, 12)]
    long_spans = [(20, 29), (1, 3), (7, 26), (14, 29)][:n_long]
    return {
        "weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.5,
        "bias": torch.randn(VOCAB, generator=g) * 0.1,
        "short_hidden": torch.randn(2 * PAIRS, SHORT, HIDDEN, generator=g),
        "short_labels": _labels(2 * PAIRS, SHORT, short_spans, g),
        "long_hidden": torch.randn(n_long, LONG, HIDDEN, generator=g),
        "long_labels": _labels(n_long, LONG, long_spans, g),
        "ref_short_logps": -20 * torch.rand(2 * PAIRS, generator=g),
        "ref_long_logps": -20 * torch.rand(n_long, generator=g),
        "options": dict(loss_type=loss_type, beta=0.3, alpha=1.5, gamma=0.2, ra_target=ra_target),
    }


def _leaves(case: dict) -> dict:
    return {
        k: v.clone().requires_grad_() if v.is_floating_point() and "ref" not in k else v
        for k, v in case.items()
        if k != "options"
    }


def _run(inputs: dict, options: dict, path: str, group=None) -> torch.Tensor:
    """The loss by ``fused_solopo_loss`` or, ``path="sums"``, by per-sequence partial sums of
    ``fused_linear_logprobs`` and ``solopo_loss`` (what a trainer with its own forward does)."""
    refs = {
        "ref_short_logps": inputs["ref_short_logps"],
        "ref_long_logps": inputs["ref_long_logps"],
    }
    if path == "fused":
        return fused_solopo_loss(
            inputs["weight"], inputs["short_hidden"], inputs["short_labels"], inputs["long_hidden"],
            inputs["long_labels"], inputs["bias"], context_parallel_group=group, **refs, **options,
        ).loss  # fmt: skip
    sums, counts = [], []
    for side in ("short", "long"):
        labels = inputs[f"{side}_labels"]
        tok = fused_linear_logprobs(
            inputs[f"{side}_hidden"], inputs["weight"], labels, inputs["bias"]
        )
        sums.append(tok.sum(-1))
        counts.append((labels != IGNORE).sum(-1))
    return solopo_loss(
        sums[0], counts[0], sums[1], counts[1], context_parallel_group=group, **refs, **options
    ).loss


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    failures: list[str] = []
    try:
        seed = 0
        for order in cp.SHARD_ORDERS:
            for loss_type in LOSS_TYPES:
                for ra_target in ("chosen", "both"):
                    for path in ("fused", "sums"):
                        seed += 1
                        what = f"world={world} order={order} {loss_type}/{ra_target} path={path}"
                        try:
                            _check_case(rank, world, order, _case(loss_type, ra_target, seed), path)
                        except AssertionError as error:
                            failures.append(f"{what}: {error}")
        _check_no_response_anywhere(rank, world, failures)
    except Exception:  # any crash is a failure of this rank, reported like the others
        failures.append(traceback.format_exc())
    Path(out_dir, f"rank{rank}.txt").write_text("\n".join(failures))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _check_case(rank: int, world: int, order: str, case: dict, path: str) -> None:
    options = case["options"]
    full = _leaves(case)
    loss = _run(full, options, path)
    loss.backward()

    local = _leaves(case)
    for key in ("short_hidden", "long_hidden"):
        local[key] = cp.shard_sequence(case[key], rank, world, order=order).requires_grad_()
    for key in ("short_labels", "long_labels"):
        local[key] = cp.shard_sequence(case[key], rank, world, order=order, pad_value=IGNORE)
    got = _run(local, options, path, group=torch.distributed.group.WORLD)
    got.backward()

    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, got.detach())
    assert all(torch.equal(x, losses[0]) for x in losses), f"ranks disagree on the loss: {losses}"
    reference.assert_close_rel(got.detach(), loss.detach(), 1e-6, "loss")
    for key in ("short_hidden", "long_hidden"):
        expected = cp.shard_sequence(full[key].grad, rank, world, order=order)
        reference.assert_close_rel(
            local[key].grad, expected, 1e-5, f"{key} gradient (this rank's slice)"
        )
    for key in ("weight", "bias"):
        summed = local[key].grad.clone()
        torch.distributed.all_reduce(summed)
        reference.assert_close_rel(
            summed, full[key].grad, 1e-5, f"{key} gradient summed over the group"
        )


def _check_no_response_anywhere(rank: int, world: int, failures: list[str]) -> None:
    case = _case("simpo", "chosen", 99)
    case["long_labels"][1] = IGNORE  # long row 1 has no response token on any rank
    local = _leaves(case)
    for key in ("short_hidden", "long_hidden"):
        local[key] = cp.shard_sequence(case[key], rank, world)
    for key in ("short_labels", "long_labels"):
        local[key] = cp.shard_sequence(case[key], rank, world, pad_value=IGNORE)
    try:
        _run(local, case["options"], "fused", group=torch.distributed.group.WORLD)
    except ValueError as error:
        if (
            "long_lengths" not in str(error)
            or "[1]" not in str(error)
            or "any rank" not in str(error)
        ):
            failures.append(f"unexpected message: {error}")
    else:
        failures.append("no ValueError for a row without any response token")


@pytest.mark.parametrize("world", [2, 4])
def test_split_rows_equal_one_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        torch.multiprocessing.spawn(_worker, args=(world, init_file, tmp), nprocs=world, join=True)
        failures = [Path(tmp, f"rank{r}.txt").read_text() for r in range(world)]
    assert not any(failures), "\n".join(f"rank {r}: {f}" for r, f in enumerate(failures) if f)
