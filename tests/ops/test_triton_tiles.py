"""The Triton backend (``solopo_kernels.ops.triton_tiles``) against the float64 reference and the
torch backend, at small shapes that run under ``TRITON_INTERPRET=1`` on the CPU, and compiled on a
CUDA machine (where tests/conftest.py makes the GPU the default device of these tests).

Tolerances (max |ours - reference| / max |reference|, reference in float64 from the same inputs):
float32: values and gradients <= 1e-5; bfloat16/float16: values <= 1e-5, gradients <= 1e-2.
Every test counts the kernel launches (tests/instruments.py), so a silent fallback to torch fails.
"""

from __future__ import annotations

import os
from dataclasses import replace
from unittest import mock

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from solopo_kernels import fused_linear_logprobs  # noqa: E402
from solopo_kernels.checks import value_checks_disabled  # noqa: E402
from solopo_kernels.ops import logprobs as dispatch  # noqa: E402
from solopo_kernels.ops import (  # noqa: E402
    torch_tiles,
    triton_configs,  # noqa: E402
    triton_tiles,
)
from solopo_kernels.ops.tiles import KernelOptions  # noqa: E402
from tests import reference  # noqa: E402
from tests.inputs import IGNORE, Head, float64_leaf, random_hidden, response_labels  # noqa: E402
from tests.instruments import AllocationRecorder, LaunchCounter  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Shapes that are multiples of no block size (interpreter blocks: 16 rows, 32 columns, 16 of H).
V, H = 150, 40
# Wide enough for five real vocabulary splits at the column alignment of the machine (32 in the
# interpreter, 256 on a GPU): 150 or 1046.
V_SPLITS = 4 * triton_configs.SPLIT_ALIGN + 22


@pytest.fixture
def launches():
    """Triton kernel launches during the test, by kind (``launches["forward"]``); asserts after
    the test that the Triton forward really ran (unless the test sets ``expect_none``, and then
    that none happened)."""
    with LaunchCounter() as counts:
        counts.expect_none = False
        yield counts
    if counts.expect_none:
        assert counts["forward"] == 0 and counts["dlogits"] == 0
    else:
        assert counts["forward"] > 0, "the Triton forward kernel never ran"


def _params(hidden, head):
    return [hidden, head.weight] + ([head.bias] if head.bias is not None else [])


# These tests are about the recompute kernel: nothing saved unless a test asks (saved logits have
# their own tests in test_saved_logits.py).
STRICT = KernelOptions(saved_logits_bytes=0)


def _run(hidden, head, labels, upstream, backend, **kwargs):
    kwargs.setdefault("kernel_options", STRICT)
    out = fused_linear_logprobs(hidden, head.weight, labels, head.bias, backend=backend, **kwargs)
    grads = torch.autograd.grad((out * upstream).sum(), _params(hidden, head))
    return out, grads


def _reference(hidden, head, labels, upstream, temperature=1.0):
    ref_head, ref_hidden = head.float64(), float64_leaf(hidden)
    out = reference.token_logps(
        ref_hidden, ref_head.weight, labels, ref_head.bias, temperature=temperature
    )
    grads = torch.autograd.grad((out * upstream.double()).sum(), _params(ref_hidden, ref_head))
    return out, grads


def _check(out, grads, expected, expected_grads, grad_tol, params):
    assert out.dtype == torch.float32
    reference.assert_close_rel(out, expected, 1e-5, "log-probs")
    for name, g, r, p in zip(("hidden", "weight", "bias"), grads, expected_grads, params):
        assert g.dtype == p.dtype, f"grad {name} dtype"
        reference.assert_close_rel(g, r, grad_tol, f"grad {name}")


def _batch(rows, length, dtype, bias, vocab=V, hidden=H):
    head = Head.random(vocab, hidden, bias=bias, dtype=dtype)
    x = random_hidden(rows, length, hidden, dtype=dtype)
    labels = response_labels(rows, length, vocab, min_response=length // 2)
    labels[-1, -1] = vocab - 1  # the last vocabulary id, in the ragged last vocabulary tile
    return x, head, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_matches_float64_reference(dtype, bias, temperature, launches):
    x, head, labels = _batch(3, 19, dtype, bias)
    upstream = torch.randn(labels.shape)
    # (16, 64): several token tiles and vocabulary tiles in the backward, the last ones ragged.
    out, grads = _run(
        x, head, labels, upstream, "triton", temperature=temperature, chunk_size=(16, 64)
    )
    assert torch.all(out[labels == IGNORE] == 0)
    expected, expected_grads = _reference(x, head, labels, upstream, temperature)
    _check(out, grads, expected, expected_grads, GRAD_TOL[dtype], _params(x, head))
    n = int((labels != IGNORE).sum())
    assert launches["dlogits"] == -(-n // 16) * 3  # token tiles x vocabulary tiles (64+64+22)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_torch_backend(dtype, launches):
    x, head, labels = _batch(2, 23, dtype, bias=True)
    upstream = torch.randn(labels.shape)
    ours = _run(x, head, labels, upstream, "triton", temperature=0.9)
    theirs = _run(x, head, labels, upstream, "torch", temperature=0.9)
    reference.assert_close_rel(ours[0], theirs[0], 1e-5, "log-probs")
    for g, r in zip(ours[1], theirs[1]):
        reference.assert_close_rel(g, r, GRAD_TOL[dtype], "grads")


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_vocab_splits_merge_exactly(splits, dtype, launches):
    """Split-V (the GPU's path when rows alone don't fill it): equal to one split and to the
    reference, with targets in every split including the last vocabulary id."""
    n, vocab, align = 21, V_SPLITS, triton_configs.SPLIT_ALIGN
    assert triton_tiles.split_columns(vocab, splits)[1] == splits  # really that many splits
    rows = torch.randn(n, H).to(dtype)
    head = Head.random(vocab, H, bias=True, dtype=dtype)
    targets = torch.randint(0, vocab, (n,))
    targets[:4] = torch.tensor([0, align - 1, align, vocab - 1])  # split edges
    one = replace(triton_tiles.default_tiles(n, H, vocab, rows.device, None, dtype=dtype), splits=1)
    with torch.no_grad():
        logp_1, lse_1, _ = triton_tiles.forward(
            rows, head.weight, head.bias, targets, temperature=1.0, tiles=one
        )
        many = replace(one, splits=splits)
        logp_s, lse_s, _ = triton_tiles.forward(
            rows, head.weight, head.bias, targets, temperature=1.0, tiles=many
        )
    expected = reference.token_logps(rows, head.weight, targets, head.bias)
    reference.assert_close_rel(logp_s, expected, 1e-5, "log-probs")
    reference.assert_close_rel(logp_s, logp_1, 1e-6, "splits vs one split")
    reference.assert_close_rel(lse_s, lse_1, 1e-6, "lse, splits vs one split")


def test_triton_is_deterministic(launches):
    x, head, labels = _batch(2, 17, torch.float32, bias=True)
    upstream = torch.randn(labels.shape)
    first = _run(x, head, labels, upstream, "triton", chunk_size=(8, 64))
    second = _run(x, head, labels, upstream, "triton", chunk_size=(8, 64))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_one_row_with_the_last_vocabulary_id(dtype, launches):
    head = Head.random(V, H, bias=True, dtype=dtype)
    x = random_hidden(1, H, dtype=dtype)
    labels = torch.tensor([V - 1])
    upstream = torch.randn(1)
    out, grads = _run(x, head, labels, upstream, "triton")
    expected, expected_grads = _reference(x, head, labels, upstream)
    _check(out, grads, expected, expected_grads, GRAD_TOL[dtype], _params(x, head))


def test_triton_tiny_and_odd_sizes(launches):
    """H and V smaller than one block, and H not a multiple of BLOCK_K."""
    for vocab, hidden in [(1, 3), (7, 5), (33, 17)]:
        x, head, labels = _batch(2, 5, torch.float32, bias=True, vocab=vocab, hidden=hidden)
        upstream = torch.randn(labels.shape)
        out, grads = _run(x, head, labels, upstream, "triton")
        expected, expected_grads = _reference(x, head, labels, upstream)
        _check(out, grads, expected, expected_grads, 1e-5, _params(x, head))


def test_triton_non_contiguous_hidden_and_tied_weight(launches):
    """The usual shifted slice of hidden states, and a weight shared with the input embedding
    (its gradient adds both uses) that is a transposed view: any strides."""
    ids = torch.randint(0, V, (3, 12))
    embedding = torch.nn.Parameter(torch.randn(H, V).t())  # (V, H), non-contiguous
    labels = response_labels(3, 11, V)

    def loss(backend):
        emb = embedding[ids]
        hidden = (emb * 1.5)[:, :-1]  # not viewable as (N, H)
        assert not hidden.is_contiguous() and not embedding.is_contiguous()
        if backend == "reference":
            out = reference.token_logps(hidden.double(), embedding.double(), labels)
        else:
            out = fused_linear_logprobs(hidden, embedding, labels, backend=backend)
        return (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()

    (grad,) = torch.autograd.grad(loss("triton"), [embedding])
    (expected,) = torch.autograd.grad(loss("reference"), [embedding])
    reference.assert_close_rel(grad, expected, 1e-5, "tied weight grad")


def test_triton_all_positions_ignored(launches):
    head = Head.random(V, H, bias=True)
    x = random_hidden(2, 4, H)
    labels = torch.full((2, 4), IGNORE)
    out = fused_linear_logprobs(x, head.weight, labels, head.bias, backend="triton")
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))
    assert torch.equal(head.bias.grad, torch.zeros_like(head.bias))
    launches.expect_none = True  # zero rows: nothing to launch


def test_triton_out_of_range_targets_match_no_column(launches):
    """With value checks off, an out-of-range id reads nothing out of bounds: its target logit is
    0, so its log-prob is -lse, and its gradient is just -g * softmax."""
    rows = torch.randn(3, H)
    weight = torch.randn(V, H)
    targets = torch.tensor([-5, V, 7])
    tiles = triton_tiles.default_tiles(3, H, V, rows.device, None, dtype=rows.dtype)
    with value_checks_disabled():
        logp, lse, _ = triton_tiles.forward(
            rows, weight, None, targets, temperature=1.0, tiles=tiles
        )
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp[:2], -lse[:2])
    expected_lse = torch.logsumexp(rows.double() @ weight.double().T, -1)
    reference.assert_close_rel(lse, expected_lse, 1e-6, "lse")


def test_triton_float64_is_refused(launches):
    head = Head.random(V, H, bias=False, dtype=torch.float64)
    x = random_hidden(1, 4, H, dtype=torch.float64)
    with pytest.raises(TypeError, match='backend="torch"'):
        fused_linear_logprobs(x, head.weight, torch.tensor([[1, 2, 3, 4]]), backend="triton")
    launches.expect_none = True  # refused before any launch


def test_triton_backend_resolution(launches):
    assert dispatch.resolve_backend("triton", DEVICE) is triton_tiles
    expected = triton_tiles if DEVICE.type == "cuda" else torch_tiles  # never the interpreter
    assert dispatch.resolve_backend("auto", DEVICE) is expected
    launches.expect_none = True


def test_triton_no_tile_sized_allocation_beyond_the_budget(launches):
    """No allocation of N x V with nothing saved (the strict kernels): the largest is a gradient,
    an input copy or the dlogits tile. A
    first run outside the recorder does the autotuning (on a GPU, Triton's benchmark allocates a
    256 MB L2-flush buffer, which is not the op's memory)."""
    x, head, labels = _batch(4, 40, torch.float32, bias=True, vocab=300, hidden=H)
    n = int((labels != IGNORE).sum())
    tile = (16, 64)
    assert n * 300 > max(tile[0] * tile[1], 300 * H, n * H)

    def step():
        out = fused_linear_logprobs(
            x, head.weight, labels, head.bias, chunk_size=tile, backend="triton",
            kernel_options=STRICT,
        )  # fmt: skip
        (out * torch.randn(labels.shape)).sum().backward()

    step()  # warm-up: compilation and autotuning
    with AllocationRecorder() as rec:
        step()
    size, op = rec.largest
    assert size <= max(tile[0] * tile[1], 300 * H, x.numel()), f"{op} allocated {size} elements"


def test_triton_tile_skipping_is_opt_in_and_within_its_bound(launches):
    """A peaked distribution: the bias puts ~all mass on the first 64 ids (the targets), so the
    other vocabulary tiles have |dlogits| ~ exp(-12) ~ 6e-6. With the filter on (eps = 1e-4) they
    are skipped and the gradient error stays below the documented bound; by default nothing is
    skipped."""
    n, vocab = 24, 256
    rows = torch.randn(n, H, requires_grad=True)
    weight = (torch.randn(vocab, H) * 0.1).requires_grad_()
    bias = torch.cat([torch.zeros(64), torch.full((vocab - 64,), -12.0)]).requires_grad_()
    targets = torch.randint(0, 64, (n,))
    g = torch.randn(n)
    tiles = (n, 64)  # one token tile, four vocabulary tiles

    def grads(threshold):
        options = KernelOptions(saved_logits_bytes=0, skip_threshold=threshold or 0.0)
        with LaunchCounter() as ran:
            logp = dispatch.response_logprobs(
                rows, weight, targets, bias, chunk_size=tiles, backend="triton",
                kernel_options=options,
            )  # fmt: skip
            out = torch.autograd.grad((logp * g).sum(), [rows, weight, bias])
        return logp.detach(), out, ran["skipped_tiles"]

    exact_logp, exact, skipped_default = grads(None)
    eps = 1e-4
    logp, filtered, skipped = grads(eps)
    assert skipped_default == 0 and skipped == 3
    assert torch.equal(logp, exact_logp)  # values are never filtered
    err_rows = (filtered[0] - exact[0]).abs().max().item()
    err_weight = (filtered[1] - exact[1]).abs().max().item()
    err_bias = (filtered[2] - exact[2]).abs().max().item()
    assert err_rows <= eps * (vocab - 64) * weight.abs().max().item()
    assert err_weight <= eps * n * rows.abs().max().item()
    assert err_bias <= eps * n
    assert max(err_rows, err_weight, err_bias) > 0  # something was really dropped
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="skip_threshold"):
            KernelOptions(skip_threshold=bad)


# ---------------------------------------------------------------------------------------------
# Launch geometry on a GPU, from the same pure functions the launcher uses, with mocked SM counts.

GPU_GEOMETRY = dict(
    max_block_n=triton_configs.GPU_MAX_BLOCK_N, split_align=triton_configs.GPU_SPLIT_ALIGN
)


@pytest.mark.parametrize("sm_count", [108, 132])  # A100, H100/H200
@pytest.mark.parametrize("n_rows", [1, 64, 128, 512, 2048, 8192, 65536])
def test_forward_grid_fills_the_gpu_at_any_n(sm_count, n_rows, launches):
    """Row blocks (of the largest BLOCK_N) x vocabulary splits reach PROGRAMS_PER_SM programs per
    SM, or as many as one-tile splits allow: N <= 128 used to get 31 programs (splits capped at
    V / 4096 columns) on 132 SMs, now 501."""
    launches.expect_none = True
    vocab = 128256
    splits = triton_tiles.vocab_splits(n_rows, vocab, sm_count, **GPU_GEOMETRY)
    columns, splits = triton_tiles.split_columns(
        vocab, splits, split_align=triton_configs.GPU_SPLIT_ALIGN
    )
    row_blocks = -(-n_rows // triton_configs.GPU_MAX_BLOCK_N)
    narrowest = vocab // (triton_tiles.MIN_SPLIT_TILES * triton_configs.GPU_SPLIT_ALIGN)
    programs = row_blocks * splits
    assert programs >= min(triton_tiles.PROGRAMS_PER_SM * sm_count, row_blocks * narrowest)
    assert programs >= sm_count  # at least one full wave, whatever N
    wanted = -(-triton_tiles.PROGRAMS_PER_SM * sm_count // row_blocks)
    assert splits <= max(1, 2 * wanted)  # no needless splitting
    assert columns >= triton_tiles.MIN_SPLIT_TILES * triton_configs.GPU_SPLIT_ALIGN
    assert columns % triton_configs.GPU_SPLIT_ALIGN == 0 and (splits - 1) * columns < vocab


def test_a_vocabulary_of_one_tile_gets_one_split(launches):
    launches.expect_none = True
    assert triton_tiles.vocab_splits(16, triton_configs.GPU_SPLIT_ALIGN, 132, **GPU_GEOMETRY) == 1


def test_autotuning_buckets_are_few_and_capped(launches):
    launches.expect_none = True
    buckets = {triton_configs.rows_bucket(n) for n in range(1, 200000, 97)}
    assert buckets == {64, 256, 1024, 4096, triton_configs.TUNE_ROWS_CAP}
    assert triton_configs.rows_bucket(10**9) == triton_configs.TUNE_ROWS_CAP
    assert all(
        triton_configs.rows_bucket(n) >= min(n, triton_configs.TUNE_ROWS_CAP) for n in (1, 65)
    )


def test_gpu_configs_are_split_by_operand_dtype(launches):
    """float32 operands get their own (spill-free) configs; 16-bit ones the rest."""
    launches.expect_none = True
    prune = triton_configs.configs_for_call
    configs = triton_configs.CONFIGS
    fp32 = prune(configs, {"rows_ptr": torch.empty(1, dtype=torch.float32)})
    half = prune(configs, {"rows_ptr": torch.empty(1, dtype=torch.bfloat16)})
    assert fp32 == triton_configs.FP32_CONFIGS and half == triton_configs.HALF_CONFIGS
    assert any(c.kwargs["BLOCK_N"] == 64 for c in half)  # small N
    saving = prune(
        configs, {"rows_ptr": torch.empty(1), "H": 4096}, SAVE_LOGITS=True, DOT_PRECISION="tf32x3"
    )
    assert saving and all(c.kwargs["BLOCK_V"] <= 64 for c in saving)  # 128-wide spills there
    from solopo_kernels.ops import triton_tma_tiles as tma

    descriptor = mock.Mock(base=torch.empty(1, dtype=torch.bfloat16))
    tma_half = prune(tma.TMA_CONFIGS, {"rows_desc": descriptor}, originals=configs)
    assert [c.kwargs for c in tma_half] == [c.kwargs for c in half]
    assert all(c.pre_hook is tma._set_block_shapes for c in tma_half)


def test_float32_dot_precision_is_fixed_at_forward_time(launches):
    """3xTF32 at torch's default "highest" matmul precision, TF32 when torch allows it; the
    backward recomputes with the forward's choice even if the setting changed in between."""
    previous = torch.get_float32_matmul_precision()
    try:
        assert triton_tiles.dot_precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert triton_tiles.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        rows = torch.randn(5, H, requires_grad=True)
        head = Head.random(V, H, bias=False)
        targets = torch.randint(0, V, (5,))
        logp = dispatch.response_logprobs(
            rows, head.weight, targets, backend="triton", kernel_options=STRICT
        )
        torch.set_float32_matmul_precision("high")
        with mock.patch.object(
            triton_tiles, "launch_dlogits", wraps=triton_tiles.launch_dlogits
        ) as fill:
            logp.sum().backward()
        assert {c.kwargs["dot_precision"] for c in fill.call_args_list} == {"tf32x3"}
    finally:
        torch.set_float32_matmul_precision(previous)


def test_dlogits_rows_past_2_to_31_elements_land_in_place():
    """A user tile (chunk_size tuple) with tokens x columns >= 2**31: the tile kernel's row
    offsets are int64. Here a 3-row bf16 tile view with a row stride of 2**30 + 64 elements (its
    third row starts past 2**31; only 3 x 32 elements are ever touched)."""
    n, cols = 3, 32
    stride = 2**30 + 64
    storage = torch.empty((n - 1) * stride + cols, dtype=torch.bfloat16)
    tile = storage.as_strided((n, cols), (stride, 1))
    rows = torch.randn(n, H).bfloat16()
    weight = torch.randn(cols, H).bfloat16()
    targets = torch.tensor([0, 5, cols - 1])
    logits = rows.double() @ weight.double().T
    lse = torch.logsumexp(logits, 1).float()
    grad = torch.randn(n)
    with LaunchCounter() as ran:
        triton_tiles.launch_dlogits(
            tile, grad, rows, weight, None, targets, lse, 0, 0,
            temperature=1.0, block_max=None, dot_precision="tf32",
        )  # fmt: skip
    expected = grad.double()[:, None] * (
        torch.nn.functional.one_hot(targets, cols).double()
        - torch.exp(logits - lse.double()[:, None])
    )
    reference.assert_close_rel(tile, expected, 1e-2, "dlogits")
    assert ran["dlogits"] == 1


def _tuning_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The autotuning key Triton's tuner computes for a launch of ``kernel`` (its ``key``
    arguments, then the dtype of every tensor argument), from the recorded arguments."""
    names = kernel.arg_names
    named = {**dict(zip(names, args)), **kwargs}
    keys = ["H", "V", "ROWS", *(k for k in triton_configs._FLAG_KEYS if k in names)]
    dtypes = tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
    return (*(named.get(k) for k in keys), *dtypes)


@pytest.mark.parametrize("save", [False, True], ids=["nothing-saved", "saved-logits"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_a_huge_first_call_tunes_on_a_prefix_with_its_own_key(save, bias):
    """More rows than the largest tuning bucket: the first call launches once on the first
    TUNE_ROWS_CAP rows (where the autotuner benchmarks the configs), then on all rows, with the
    same tuning key (saved logits included: SAVE_LOGITS is in the key, and a prefix without them
    tuned a key the call never used); later calls of that shape launch once. Checked on the launch
    arguments, with the launcher replaced by a recorder (the GPU path, without a GPU)."""
    from solopo_kernels.ops import triton_kernels

    calls, live_at_launch = [], []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                # Bytes the forward has allocated and not freed at this launch: the prefix's saved
                # logits are freed before the call allocates its own, so the peak stays within
                # the call's share of the budget.
                live_at_launch.append(recorder.live_bytes)
                calls.append((args[:5] + (None,) + args[6:], kwargs))  # no reference kept

            return launch

    cap, n = 16, 40
    rows, weight = torch.randn(n, H), torch.randn(V, H)
    bias_ = torch.randn(V) if bias else None
    targets = torch.randint(0, V, (n,))
    options = KernelOptions(saved_logits_bytes=4 * n * V if save else 0)
    tiles = triton_tiles.default_tiles(n, H, V, rows.device, None, options, dtype=rows.dtype)
    with (
        mock.patch.object(triton_configs, "INTERPRET", False),
        mock.patch.object(triton_configs, "LAUNCH_CONFIG", {}),
        mock.patch.object(triton_configs, "TUNE_ROWS_CAP", cap),
        mock.patch.object(triton_tiles, "FORWARD_LAUNCHER", Recorder()),
        mock.patch.object(triton_configs, "_tuned_on_prefix", set()),
        AllocationRecorder() as recorder,
    ):
        for _ in range(2):
            _, _, saved = triton_tiles.forward(
                rows, weight, bias_, targets, temperature=1.0, tiles=tiles, save_logits=save
            )
            assert (saved is not None) == save
            del saved  # the next call's launches must not see it
    kernel = triton_kernels.forward_kernel
    n_index = kernel.arg_names.index("N")
    assert [args[n_index] for args, _ in calls] == [cap, n, n]
    keys = {_tuning_key(kernel, args, kwargs) for args, kwargs in calls}
    assert len(keys) == 1, keys  # the prefix tuned the key the call uses
    assert {kwargs["SAVE_LOGITS"] for _, kwargs in calls} == {save}
    # Besides the saved logits: the (3, splits, rows) partials and a few per-row results.
    slack = 4 * 3 * tiles.splits * n + 4 * 8 * n
    prefix_saved, call_saved = (4 * rows_ * tiles.saved_columns * save for rows_ in (cap, n))
    assert live_at_launch[0] <= prefix_saved + slack  # the call's own not allocated yet
    assert all(live <= call_saved + slack for live in live_at_launch[1:])  # the prefix's freed


def test_no_autotuning_candidate_spills_in_the_compile_report():
    """Every config the autotuner may pick for a case of the base compile report (no bias, no
    ROUND_HEAD, H = 4096; per dtype, saved logits or not, sm_90/sm_80) compiled without register
    spills, for both Triton versions (3.6, the version torch 2.11 ships, is measured only there;
    tests/ops/test_compile.py checks every flag combination with 3.9); and every exclusion there
    spilled with at least one of them."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compile"
    reports = sorted(folder.glob("compile_triton-*.json"))
    assert {json.loads(p.read_text())["triton"] for p in reports} >= {"3.6.0", "3.9.0"}
    by_name = {triton_configs.config_name(c): c for c in triton_configs.CONFIGS}
    checked, excluded_cases, spilled_cases = 0, set(), set()
    for path in reports:
        for row in json.loads(path.read_text())["rows"]:
            if row["status"] != "used" or row["kernel"] == "saved_dlogits":
                continue
            config = by_name[f"{row['block']} w{row['num_warps']} s{row['num_stages']}"]
            excluded = triton_configs.spills(
                config, row["kernel"].removesuffix("+save"), rows=row["dtype"],
                round_head=False, bias=False, flag=row["kernel"].endswith("+save"),
                dot=row["dot_precision"], hidden=4096, major=int(row["arch"][3]),
            )  # fmt: skip
            spilled = row["spill_stores"] > 0 or row["spill_loads"] > 0
            assert excluded or not spilled, f"{path.name}: {row}"
            case = (row["kernel"], row["dtype"], row["arch"], row["block"], row["num_warps"])
            if excluded:
                excluded_cases.add(case)
            if spilled:
                spilled_cases.add(case)
            checked += 1
    assert checked > 100
    assert excluded_cases <= spilled_cases  # each exclusion spilled with at least one Triton


def test_weight_offsets_past_2_to_31_elements_are_read_in_place(launches):
    """A weight whose ``k * stride`` passes 2**31 (a transposed tied embedding with V * H >=
    2**31 has stride V along H): the kernels' weight offsets are int64. Here a (32, 40) bf16
    weight view with an H-stride of 2**26 elements (row 32 of H starts past 2**31; only 32 x 40
    elements are ever touched, the rest of the storage is never paged in)."""
    vocab, hidden, stride = 32, H, 2**26
    storage = torch.empty((hidden - 1) * stride + vocab, dtype=torch.bfloat16)
    weight = storage.as_strided((vocab, hidden), (1, stride))
    weight.copy_(torch.randn(vocab, hidden))
    rows = torch.randn(5, hidden).bfloat16()
    targets = torch.tensor([0, 3, 31, 7, 12])
    tiles = triton_tiles.default_tiles(5, hidden, vocab, rows.device, None, dtype=rows.dtype)
    logp, _, _ = triton_tiles.forward(rows, weight, None, targets, temperature=1.0, tiles=tiles)
    expected = torch.log_softmax(rows.double() @ weight.double().T, 1)[torch.arange(5), targets]
    reference.assert_close_rel(logp, expected, 1e-5, "logp")
