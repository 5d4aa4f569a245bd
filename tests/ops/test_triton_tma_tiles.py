"""The persistent TMA variant (``backend="triton_tma"``) against the float64 reference: values and
gradients, several work items per program, the saved-logits option, and the fall back to the
pointer kernels when TMA cannot address the weight. Under ``TRITON_INTERPRET=1`` (Triton 3.9's
interpreter emulates the descriptors) and compiled on a CUDA machine.

Tolerances as in test_triton_tiles.py: float32 values and gradients <= 1e-5; bfloat16/float16
values <= 1e-5, gradients <= 1e-2.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from solopo_kernels import fused_linear_logprobs  # noqa: E402
from solopo_kernels.ops import KernelOptions, triton_tma_tiles  # noqa: E402
from tests import reference
from tests.inputs import IGNORE, Head, float64_leaf, random_hidden, response_labels  # noqa: E402
from tests.instruments import launch_totals  # noqa: E402

pytestmark = pytest.mark.triton

if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("TMA needs sm_90 or newer", allow_module_level=True)

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
V, H = 150, 48  # H * 2 bytes and H * 4 bytes are multiples of 16: TMA can address the rows


def _counts() -> dict[str, int]:
    return dict(launch_totals())


def _ran(before: dict[str, int], kind: str) -> int:
    return launch_totals()[kind] - before.get(kind, 0)


def _check(dtype, bias, temperature, options=None, weight_transform=None):
    options = options or KernelOptions(saved_logits_bytes=0)  # the recompute kernel by default
    head = Head.random(V, H, bias=bias, dtype=dtype)
    weight = head.weight if weight_transform is None else weight_transform(head.weight)
    hidden = random_hidden(3, 21, H, dtype=dtype)
    labels = response_labels(3, 21, V, min_response=10)
    labels[-1, -1] = V - 1
    upstream = torch.randn(labels.shape)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    out = fused_linear_logprobs(
        hidden, weight, labels, head.bias, temperature=temperature, chunk_size=(16, 64),
        backend="triton_tma", kernel_options=options,
    )  # fmt: skip
    grads = torch.autograd.grad((out * upstream).sum(), params)
    ref_head, ref_hidden = head.float64(), float64_leaf(hidden)
    ref_weight = ref_head.weight if weight_transform is None else weight_transform(ref_head.weight)
    expected = reference.token_logps(
        ref_hidden, ref_weight, labels, ref_head.bias, temperature=temperature
    )
    ref_params = [ref_hidden, ref_head.weight] + ([ref_head.bias] if bias else [])
    ref_grads = torch.autograd.grad((expected * upstream.double()).sum(), ref_params)
    reference.assert_close_rel(out, expected, 1e-5, "log-probs")
    for g, r, p in zip(grads, ref_grads, params):
        assert g.dtype == p.dtype
        reference.assert_close_rel(g, r, GRAD_TOL[dtype], "grad")
    return int((labels != IGNORE).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_tma_matches_float64_reference(dtype, bias):
    before = _counts()
    n = _check(dtype, bias, temperature=0.7)
    assert _ran(before, "tma_forward") == 1 and _ran(before, "forward") == 0
    assert _ran(before, "tma_dlogits") == -(-n // 16) * 3  # token tiles x (64 + 64 + 22)
    assert _ran(before, "tma_fallback") == 0


def test_tma_persistent_programs_walk_several_items():
    """More (row block, split) items than programs: each program loops over its share."""
    rows = torch.randn(40, H)
    head = Head.random(V, H, bias=True)
    targets = torch.randint(0, V, (40,))
    targets[:3] = torch.tensor([0, 32, V - 1])
    tiles = triton_tma_tiles.default_tiles(40, H, V, rows.device, None, dtype=rows.dtype)
    tiles = replace(tiles, splits=3)  # 3 row blocks x 3 splits = 9 items on 3 programs (CPU)
    with torch.no_grad():
        logp, lse, _ = triton_tma_tiles.forward(
            rows, head.weight, head.bias, targets, temperature=1.0, tiles=tiles
        )
    expected = reference.token_logps(rows, head.weight, targets, head.bias)
    reference.assert_close_rel(logp, expected, 1e-5, "log-probs")
    logits = rows.double() @ head.weight.double().T + head.bias.double()
    reference.assert_close_rel(lse, torch.logsumexp(logits, -1), 1e-6, "lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_with_saved_logits(dtype):
    before = _counts()
    _check(dtype, True, temperature=1.3, options=KernelOptions(saved_logits_bytes=4 * 40 * 64))
    assert _ran(before, "saved_dlogits") > 0 and _ran(before, "tma_dlogits") > 0


def test_tma_falls_back_to_pointer_kernels_for_a_transposed_weight():
    """A weight TMA cannot address (a tied embedding seen transposed: inner stride != 1) runs on
    the pointer kernels, with the same results."""
    before = _counts()
    _check(torch.float32, False, 1.0, weight_transform=lambda w: w.t().contiguous().t())
    assert _ran(before, "tma_fallback") == 1 and _ran(before, "forward") == 1
    assert _ran(before, "tma_forward") == 0 and _ran(before, "tma_dlogits") == 0
