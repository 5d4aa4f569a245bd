"""Kernel tests: no saved logits outlive the test that made them (the saved-logits budget is one
per device and process, see solopo_kernels/ops/saved_logits.py: a leak would shrink what the next
test may save, and would be a bug)."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def _no_saved_logits_outlive_the_test():
    from solopo_kernels.ops.saved_logits import LEDGER

    yield
    if any(LEDGER.in_use_by_device().values()):
        gc.collect()  # a reference cycle is still a leak of the test, not of the kernels
    left = {device: n for device, n in LEDGER.in_use_by_device().items() if n}
    assert not left, f"saved logits still alive after the test (bytes per device): {left}"
