"""One saved-logits budget per training step: the policy's forwards of a step (the short rows and
the long rows when padded, one forward per packed row when packed; the reference forward keeps
nothing) keep their saved logits until the step's backward, and together they never hold more than
``head_kernel.options.saved_logits_bytes``. Measured on the saved tensors themselves
(tests/instruments.py: SavedLogitsProbe), independently of the package's ledger."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from tests.instruments import SavedLogitsProbe  # noqa: E402
from tests.integrations import common  # noqa: E402

LAYOUTS = {"padded": {}, "packed": {"padding_free": True, "max_packed_length": 40}}


def _step(tmp_path, budget: int, layout: str):
    trainer = common.trainer(
        tmp_path,
        head_kernel={"backend": "torch", "options": {"saved_logits_bytes": budget}},
        **LAYOUTS[layout],
    )
    batch = common.batch(trainer, [0, 1, 2, 3])
    with SavedLogitsProbe() as probe:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    return probe, loss.detach(), grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_training_step_keeps_its_saved_logits_within_one_budget(tmp_path, layout):
    # Unbounded: every forward of the step saves all of its logits.
    free, free_loss, free_grads = _step(tmp_path / "free", 2**40, layout)
    saving = [nbytes for nbytes in free.calls if nbytes]
    assert len(saving) >= (2 if layout == "padded" else 3), free.calls
    assert free.peak_bytes == sum(saving)  # all alive together until the backward
    # A budget below the step's total but above any one forward's: a budget per call would let
    # the step keep all of them.
    budget = sum(saving) - min(saving) // 2
    assert budget > max(saving)
    probe, loss, grads = _step(tmp_path / "shared", budget, layout)
    assert probe.peak_bytes <= budget, (probe.calls, budget)
    assert 0 < sum(probe.calls) < sum(saving)
    assert probe.live_bytes == 0  # the backward consumed them all
    # The budget changes which tiles are recomputed, not the values.
    torch.testing.assert_close(loss, free_loss, rtol=1e-6, atol=0)
    for got, want in zip(grads, free_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
