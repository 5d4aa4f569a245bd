"""The opt-in saved-logits budget (``KernelOptions(saved_logits_bytes=...)``) on both backends:
exact against the float64 reference whatever the budget, the backward really skips the recompute
of the saved tiles (FLOP count, launch counts), and the memory it costs stays within the budget
(allocation recorder).

Tolerances as in test_logprobs.py: float32 values and gradients <= 1e-5; bfloat16 values <= 1e-5,
gradients <= 1e-2 (relative to the float64 reference on the same rounded inputs).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from solopo_kernels import fused_linear_logprobs, fused_solopo_loss
from solopo_kernels.ops import KernelOptions, response_logprobs
from solopo_kernels.ops.saved_logits import LEDGER
from tests import reference
from tests.inputs import (
    BACKENDS,
    IGNORE,
    Head,
    float64_leaf,
    random_hidden,
    response_labels,
    skip_unless_backend_runs,
)
from tests.instruments import (
    AllocationRecorder,
    SavedLogitsProbe,
    expect_backend,
    launch_totals,
)

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
V, H = 150, 24
TILE = (16, 64)  # several token and vocabulary tiles


def _budgets(n_rows: int) -> dict[str, int]:
    """No saving, a partial budget (64 of the 150 columns), and all of N x V."""
    return {"none": 0, "partial": 4 * n_rows * 64 + 100, "all": 4 * n_rows * V}


def _saved_launches() -> int:
    return launch_totals()["saved_dlogits"]


def _recompute_launches() -> int:
    return launch_totals()["dlogits"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", ["none", "partial", "all"])
def test_saved_logits_match_the_float64_reference(backend, dtype, budget):
    skip_unless_backend_runs(backend)
    head = Head.random(V, H, bias=True, dtype=dtype)
    hidden = random_hidden(2, 23, H, dtype=dtype)
    labels = response_labels(2, 23, V, min_response=10)
    labels[-1, -1] = V - 1
    n_rows = int((labels != IGNORE).sum())
    options = KernelOptions(saved_logits_bytes=_budgets(n_rows)[budget])
    upstream = torch.randn(labels.shape)
    params = [hidden, head.weight, head.bias]
    saved_before, recomputed_before = _saved_launches(), _recompute_launches()
    with expect_backend(backend, backward=budget != "all"):
        out = fused_linear_logprobs(
            hidden, head.weight, labels, head.bias, temperature=0.8, chunk_size=TILE,
            backend=backend, kernel_options=options,
        )  # fmt: skip
        grads = torch.autograd.grad((out * upstream).sum(), params)

    ref_head, ref_hidden = head.float64(), float64_leaf(hidden)
    expected = reference.token_logps(
        ref_hidden, ref_head.weight, labels, ref_head.bias, temperature=0.8
    )
    reference.assert_close_rel(out, expected, 1e-5, "log-probs")
    ref_grads = torch.autograd.grad(
        (expected * upstream.double()).sum(), [ref_hidden, ref_head.weight, ref_head.bias]
    )
    for name, g, r, p in zip(("hidden", "weight", "bias"), grads, ref_grads, params):
        assert g.dtype == p.dtype
        reference.assert_close_rel(g, r, GRAD_TOL[dtype], f"grad {name}")
    if backend == "triton":  # which tiles were read back and which recomputed
        saved, recomputed = (
            _saved_launches() - saved_before,
            _recompute_launches() - recomputed_before,
        )
        token_tiles = -(-n_rows // TILE[0])
        assert saved == {"none": 0, "partial": token_tiles, "all": token_tiles * 3}[budget]
        assert recomputed == {"none": token_tiles * 3, "partial": token_tiles * 2, "all": 0}[budget]


def _matmul_flops(budget_columns: int, n_rows: int = 40, vocab: int = 256, hidden: int = 16):
    head = Head.random(vocab, hidden, bias=False)
    rows = random_hidden(n_rows, hidden)
    labels = torch.randint(0, vocab, (n_rows,))
    options = KernelOptions(saved_logits_bytes=4 * n_rows * budget_columns)
    with FlopCounterMode(display=False) as counter:
        out = fused_linear_logprobs(
            rows, head.weight, labels, chunk_size=(16, 64), backend="torch",
            kernel_options=options,
        )  # fmt: skip
        (out * torch.randn(n_rows)).sum().backward()
    return counter.get_total_flops(), n_rows * hidden * vocab


@pytest.mark.parametrize("columns", [0, 64, 128, 256])
def test_saved_columns_skip_their_recompute(columns):
    """8 N H V FLOPs with nothing saved, 6 N H V with everything, 2 N H less per saved column."""
    flops, nhv = _matmul_flops(columns)
    n_rows, hidden = 40, 16
    assert flops == 8 * nhv - 2 * n_rows * hidden * columns


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_logits_cost_no_more_than_the_budget(backend):
    """The peak of what the op keeps alive grows by at most the budget over the default, and no
    single allocation exceeds the budget plus one tile (gradients and input copies aside)."""
    skip_unless_backend_runs(backend)
    head = Head.random(V, H, bias=True)
    hidden = random_hidden(2, 24, H)
    labels = response_labels(2, 24, V, min_response=12)
    n_rows = int((labels != IGNORE).sum())
    upstream = torch.randn(labels.shape)
    tile_elements = TILE[0] * TILE[1]

    def run(budget: int) -> AllocationRecorder:
        def step():
            out = fused_linear_logprobs(
                hidden, head.weight, labels, head.bias, chunk_size=TILE, backend=backend,
                kernel_options=KernelOptions(saved_logits_bytes=budget),
            )  # fmt: skip
            (out * upstream).sum().backward()
            hidden.grad = head.weight.grad = head.bias.grad = None

        step()  # warm-up outside the recorder (compilation, autotuning)
        with AllocationRecorder() as rec:
            step()
        return rec

    default = run(0)
    for budget in (4 * n_rows * 64, 4 * n_rows * V):
        rec = run(budget)
        assert rec.peak_live_bytes - default.peak_live_bytes <= budget
        largest = max(n for n, _ in rec.sizes if n not in (V * H, hidden.numel()))
        assert 4 * largest <= budget + 4 * tile_elements
        columns = budget // (4 * n_rows)
        saved = [  # (N, columns) for Triton; one flat tensor of per-tile blocks for torch
            shape
            for op, dtype, shape in rec.allocations
            if shape in ((n_rows, columns), (n_rows * columns,))
        ]
        assert saved, "the saved logits were never allocated"


def test_fused_solopo_loss_takes_the_budget():
    """The option reaches the kernel through the loss (FLOPs drop from 8 N H V to 6 N H V)."""
    head = Head.random(64, 8, bias=False)
    short_hidden = random_hidden(2, 9, 8)
    short_labels = response_labels(2, 9, 64)
    n_rows = int((short_labels != IGNORE).sum())

    def flops(options):
        with FlopCounterMode(display=False) as counter:
            out = fused_solopo_loss(
                head.weight, short_hidden, short_labels, None, None, loss_type="simpo", beta=2.0,
                alpha=0.0, backend="torch", kernel_options=options,
            )  # fmt: skip
            out.loss.backward()
        return counter.get_total_flops(), out.loss.detach()

    (plain, loss), (fast, fast_loss) = flops(KernelOptions(0)), flops(KernelOptions(4 * n_rows * 64))
    assert plain == 8 * n_rows * 8 * 64 and fast == 6 * n_rows * 8 * 64
    torch.testing.assert_close(fast_loss, loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_backward_recomputes_what_the_first_consumed(backend):
    """The backward may overwrite the saved logits; with retain_graph=True a second backward
    recomputes those tiles and gets the same gradients."""
    skip_unless_backend_runs(backend)
    head = Head.random(V, H, bias=True)
    rows = random_hidden(30, H)
    targets = torch.randint(0, V, (30,))
    options = KernelOptions(saved_logits_bytes=4 * 30 * V)
    logp = response_logprobs(
        rows, head.weight, targets, head.bias, chunk_size=TILE, backend=backend,
        kernel_options=options,
    )  # fmt: skip
    loss = (logp * torch.randn(30)).sum()
    first = torch.autograd.grad(loss, [rows, head.weight, head.bias], retain_graph=True)
    second = torch.autograd.grad(loss, [rows, head.weight, head.bias])
    for a, b in zip(first, second):
        reference.assert_close_rel(a, b, 1e-6, "second backward")


def test_torch_backward_tiles_across_saved_blocks(monkeypatch):
    """The torch backend saves one block per forward vocabulary tile; a backward whose weight
    buffer cap narrows its tiles (16-bit weights) reads tiles that straddle two blocks. Here the
    forward tiles are 64 columns and the backward's 48; the gradients still match float64."""
    from solopo_kernels.ops import gradients

    hidden_size = 8
    monkeypatch.setattr(gradients, "WEIGHT_BUFFER_BYTES", 48 * hidden_size * 4)
    head = Head.random(V, hidden_size, bias=True, dtype=torch.bfloat16)
    hidden = random_hidden(2, 9, hidden_size, dtype=torch.bfloat16)
    labels = response_labels(2, 9, V)
    n_rows = int((labels != IGNORE).sum())
    out = fused_linear_logprobs(
        hidden, head.weight, labels, head.bias, chunk_size=(16, 64), backend="torch",
        kernel_options=KernelOptions(saved_logits_bytes=4 * n_rows * 128), temperature=0.9,
    )  # fmt: skip
    upstream = torch.randn(labels.shape)
    grads = torch.autograd.grad((out * upstream).sum(), [hidden, head.weight, head.bias])
    ref_head, ref_hidden = head.float64(), float64_leaf(hidden)
    ref = reference.token_logps(ref_hidden, ref_head.weight, labels, ref_head.bias, temperature=0.9)
    ref_grads = torch.autograd.grad(
        (ref * upstream.double()).sum(), [ref_hidden, ref_head.weight, ref_head.bias]
    )
    reference.assert_close_rel(out, ref, 1e-5, "logp")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        reference.assert_close_rel(got, want, 1e-2, f"grad {name}")


def test_the_saved_logits_are_freed_by_the_backward():
    """Once the backward has consumed them, the saved logits are gone (not kept alive by a
    reference cycle until the garbage collector runs): what is still allocated after the
    backward, the gradients, is the same as with nothing saved. Torch backend (the Triton
    interpreter keeps its last launch's arguments alive, which would blur the count)."""
    import gc

    backend = "torch"
    head = Head.random(V, H, bias=True)
    hidden = random_hidden(2, 9, H)
    labels = response_labels(2, 9, V)

    def still_live(options):
        gc.collect()
        gc.disable()  # a cycle must not be rescued by a collection during the run
        try:
            with AllocationRecorder() as rec:
                out = fused_linear_logprobs(
                    hidden, head.weight, labels, head.bias, backend=backend, kernel_options=options
                )
                out.sum().backward()
                del out
            return rec.live_bytes
        finally:
            gc.enable()
            hidden.grad = head.weight.grad = head.bias.grad = None

    for options in (KernelOptions(), KernelOptions(saved_logits_bytes=0)):
        still_live(options)  # warm-up: a first call of each path leaves a few bytes behind
    assert still_live(KernelOptions()) == still_live(KernelOptions(saved_logits_bytes=0))


# ---------------------------------------------------------------------------------------------
# One budget for every call alive at once (ops/saved_logits.py): a step's short, long and packed
# forwards keep their saved logits until the backward, and together stay within the budget.


def _alive_calls(backend: str, budget: int, calls: int, n_rows: int = 30):
    """``calls`` forwards kept alive together (as a step's short and long forwards are), then one
    backward through all of them; returns the probe, the outputs' float64 reference errors and the
    ledger's bytes in use after the forwards."""
    head = Head.random(V, H, bias=True)
    rows = [random_hidden(n_rows, H) for _ in range(calls)]
    targets = [torch.randint(0, V, (n_rows,)) for _ in range(calls)]
    options = KernelOptions(saved_logits_bytes=budget)
    with SavedLogitsProbe() as probe:
        outs = [
            response_logprobs(
                r, head.weight, t, head.bias, chunk_size=TILE, backend=backend,
                kernel_options=options,
            )  # fmt: skip
            for r, t in zip(rows, targets)
        ]
        held = LEDGER.in_use(rows[0].device)
        loss = sum((o * torch.linspace(-1, 1, n_rows)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [*rows, head.weight, head.bias])
    ref_head = head.float64()
    ref_rows = [float64_leaf(r) for r in rows]
    ref = [
        reference.token_logps(r, ref_head.weight, t, ref_head.bias)
        for r, t in zip(ref_rows, targets)
    ]
    ref_loss = sum((o * torch.linspace(-1, 1, n_rows).double()).sum() for o in ref)
    ref_grads = torch.autograd.grad(ref_loss, [*ref_rows, ref_head.weight, ref_head.bias])
    for got, want in zip([*outs, *grads], [*ref, *ref_grads]):
        reference.assert_close_rel(got, want, 1e-5, "value or gradient")
    return probe, held


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_alive_together_share_one_budget(backend):
    """Three forwards alive at once, each wanting all its N x V logits (4 N V bytes), under a
    budget of 1.5 x that: the first saves all, the second the 64 columns the rest holds, the third
    nothing; at no time are more than the budget's bytes alive, and the backward gives them all
    back. (A budget per call would keep 3 x 4 N V.)"""
    skip_unless_backend_runs(backend)
    n_rows = 30
    one_call = 4 * n_rows * V
    budget = one_call * 3 // 2
    probe, held = _alive_calls(backend, budget, calls=3, n_rows=n_rows)
    assert probe.calls == [one_call, 4 * n_rows * 64, 0]
    assert probe.peak_bytes <= budget and held == one_call + 4 * n_rows * 64
    assert probe.live_bytes == 0 and LEDGER.in_use("cpu") == 0


def test_the_budget_comes_back_when_a_graph_is_dropped_or_a_forward_raises():
    """Bytes are given back when the saved logits are freed without a backward (the output and
    its graph dropped), and when the forward raises; nothing is taken without autograd."""
    from solopo_kernels.ops import torch_tiles

    head = Head.random(V, H, bias=False)
    rows, targets = random_hidden(20, H), torch.randint(0, V, (20,))

    def call():
        return response_logprobs(rows, head.weight, targets, backend="torch")

    out = call()
    assert LEDGER.in_use("cpu") == 4 * 20 * V
    del out
    assert LEDGER.in_use("cpu") == 0
    with torch.no_grad():
        call()
        assert LEDGER.in_use("cpu") == 0
    with mock.patch.object(torch_tiles, "forward", side_effect=RuntimeError("out of memory")):
        with pytest.raises(RuntimeError, match="out of memory"):
            call()
    assert LEDGER.in_use("cpu") == 0
    assert LEDGER.peak("cpu") >= 4 * 20 * V


def test_a_saved_logits_policy_is_one_method():
    """The budget's size is a policy object with one method (columns for a call, given the bytes
    in use); the options select it. A different policy is a subclass of it."""
    from solopo_kernels.ops.saved_logits import SavedLogitsBudget, SavedLogitsLedger

    assert KernelOptions(saved_logits_bytes=1000).saved_logits_budget == SavedLogitsBudget(1000)
    budget = SavedLogitsBudget(4 * 10 * 200)
    assert budget.columns(10, 150, in_use=0) == 150
    assert budget.columns(10, 500, in_use=0) == 192  # a multiple of 64 columns
    assert budget.columns(10, 500, in_use=4 * 10 * 100) == 64
    assert budget.columns(10, 500, in_use=10**9) == 0

    class Half(SavedLogitsBudget):
        def columns(self, n_rows, vocab, in_use):
            return super().columns(n_rows, vocab, in_use) // 2

    ledger = SavedLogitsLedger()
    first = ledger.reserve(Half(4 * 10 * 150), "cpu", 10, 150, most_columns=150)
    assert first.columns == 75 and ledger.in_use("cpu") == 4 * 10 * 75
    first.release()
    first.release()  # once
    assert ledger.in_use("cpu") == 0
