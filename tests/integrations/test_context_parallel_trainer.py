"""SoLoPOTrainer under context parallelism: 2 gloo processes against one (tests/integrations/
cp_worker.py: the attention is an exact all-gather stand-in for ring attention, which needs CUDA,
and attends only within the rank's slice outside the context-parallel context), for training
steps and for evaluation steps (a reference model, and precomputed reference log-probs), and the
construction-time rules.

Tolerances: training, the loss to 1e-6 relative and every parameter gradient (after the engine's
average over the group, emulated) to 1e-5 relative to its largest entry; evaluation, the loss to
1e-5 and every logged metric to 5e-5 relative (measured: 1.9e-6 and 7.8e-6; rewards near zero
make the relative error of the metrics larger; an evaluation outside the context-parallel context
is off by 0.5% to 36%); the two ranks' losses are identical.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations import context_parallel as integration  # noqa: E402
from tests.integrations import cp_worker  # noqa: E402
from tests.integrations.test_distributed import _torchrun  # noqa: E402


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_context_parallel_ranks_equal_one_process(tmp_path):
    results = _torchrun("", tmp_path / "cp.pt", module="tests.integrations.cp_worker")
    assert len(results) == len(cp_worker.CASES)
    for case, result in results.items():
        assert "error" not in result, f"{case}:\n{result.get('error')}"
        single, split = result["loss"]
        training = "/train" in case
        # float32: the slices' tiles (and which logits are saved) differ from one process's, so
        # the sums round differently; 4e-6 is a few float32 ulps of a loss of order 1.
        loss_tol, tol = (4e-6, 1e-5) if training else (1e-5, 5e-5)
        assert abs(split - single) <= loss_tol * abs(single), f"{case}: loss {split} vs {single}"
        assert result["ranks_agree"], f"{case}: the ranks returned different losses"
        worst = max(result["grad_errors"].items(), key=lambda item: item[1])
        assert worst[1] <= tol, f"{case}: gradient/metric {worst[0]} off by {worst[1]:.3g}"
    assert {case.split("/")[-1] for case in results} == {
        "train",
        "eval",
        "eval-precomputed",
        "train-moe",
    }


def _accelerator(cp_size: int, backend: str = "torch") -> SimpleNamespace:
    group = object()
    mesh = {"cp": SimpleNamespace(get_group=lambda: group)}
    config = SimpleNamespace(cp_enabled=cp_size > 1, cp_backend=backend, cp_size=cp_size)
    return SimpleNamespace(parallelism_config=config, torch_device_mesh=mesh, group=group)


def test_accelerate_context_parallelism_gives_a_head_tail_plan_scaled_by_the_group_size():
    accelerator = _accelerator(4)
    plan = integration.accelerate_plan(accelerator)
    assert plan.group is accelerator.group
    assert (plan.order, plan.shard_inputs, plan.gradient_scale) == ("head_tail", True, 4.0)
    assert integration.accelerate_plan(_accelerator(1)) is None
    assert integration.accelerate_plan(SimpleNamespace()) is None


def test_another_context_parallel_backend_is_refused_naming_it():
    with pytest.raises(ValueError, match="parallelism_config: .* cp_backend='deepspeed'"):
        integration.accelerate_plan(_accelerator(2, backend="deepspeed"))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            {"padding_free": True, "cp_size": 2},
            r"padding_free: not supported with context parallelism "
            r"\(parallelism_config.cp_size=2\).* set padding_free=False",
        ),
        (
            {"precompute": True, "cp_size": 2},
            r"precompute_ref_log_probs: not supported with context parallelism "
            r"\(parallelism_config.cp_size=2\).* precompute_ref_log_probs=False .*"
            r"\(parallelism_config.cp_size=1\)",
        ),
        (
            {"precompute": True, "deepspeed": True},
            r"precompute_ref_log_probs: not supported under DeepSpeed .*=False",
        ),
    ],
    ids=["packing+cp", "precompute+cp", "precompute+deepspeed"],
)
def test_the_parallel_setups_solopo_refuses(setup, message):
    from solopo_kernels.integrations.args import check_parallel_setup

    facts = dict(precompute=False, needs_reference=True, cp_size=1, deepspeed=False)
    facts["padding_free"] = False
    with pytest.raises(ValueError, match=message):
        check_parallel_setup(**{**facts, **setup})
    # Each part alone is fine, and so is a reference-free type that has nothing to precompute.
    for name, value in setup.items():
        check_parallel_setup(**{**facts, name: value})
    if "precompute" in setup:
        check_parallel_setup(**{**facts, **setup, "needs_reference": False})


def test_an_engine_that_cuts_the_slices_gives_an_unsharded_plan():
    accelerator = _accelerator(2)
    plan = integration.engine_plan(accelerator, accelerator.group)
    assert (plan.shard_inputs, plan.gradient_scale, plan.group) == (False, 2.0, accelerator.group)
    assert integration.engine_plan(_accelerator(1), None) is None
    with pytest.raises(
        ValueError, match="context_parallel_size: .* no context-parallel process group"
    ):
        integration.engine_plan(accelerator, None)


def test_axolotl_packing_with_context_parallelism_is_refused():
    from solopo_kernels.integrations.axolotl import check_axolotl_config

    cfg = {"rl": "dpo", "solopo": True, "context_parallel_size": 2, "dpo_padding_free": True}
    with pytest.raises(
        ValueError,
        match=r"dpo_padding_free: not supported with context parallelism \(context_parallel_size: "
        r"2\).* set dpo_padding_free: false",
    ):
        check_axolotl_config(cfg)
    check_axolotl_config({**cfg, "dpo_padding_free": False})


def test_accelerate_context_parallelism_needs_sdpa_and_hooks_the_reference_model():
    from tests.integrations import common

    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    policy.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation: context parallelism .* got 'eager'"):
        integration.prepare_torch_models(policy)
    ref.set_attn_implementation("sdpa")
    integration.prepare_torch_models(ref)
    # accelerate's hook on every attention module drops the mask for is_causal.
    hooked = [m for m in ref.modules() if m._forward_pre_hooks]
    assert len(hooked) == ref.config.num_hidden_layers
    integration.prepare_torch_models(ref)  # once only
    assert all(len(m._forward_pre_hooks) == 1 for m in hooked)


def test_precomputed_reference_with_context_parallelism_is_refused_naming_both_options(tmp_path):
    from accelerate.parallelism_config import ParallelismConfig

    from tests.integrations import common

    args = common.config(tmp_path, precompute_ref_log_probs=True)
    # The check reads the arguments before anything is loaded; a config object with cp_size=2
    # cannot be built on one CPU process, so the arguments carry a stand-in of it.
    args.parallelism_config = SimpleNamespace(cp_enabled=True, cp_size=2)
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    from solopo_kernels.integrations.trl import SoLoPOTrainer

    with pytest.raises(
        ValueError,
        match=r"precompute_ref_log_probs: not supported with context parallelism "
        r"\(parallelism_config.cp_size=2\).* precompute_ref_log_probs=False .*"
        r"\(parallelism_config.cp_size=1\)",
    ):
        SoLoPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=common.dataset(),
            processing_class=tok,
        )
    assert ParallelismConfig  # the real type the stand-in mirrors (cp_enabled, cp_size)


def test_axolotl_precompute_with_context_parallelism_is_refused_naming_both_options():
    from solopo_kernels.integrations.axolotl import check_axolotl_config

    cfg = {
        "rl": "dpo",
        "solopo": True,
        "context_parallel_size": 2,
        "precompute_ref_log_probs": True,
    }
    with pytest.raises(
        ValueError,
        match=r"precompute_ref_log_probs: not supported with context parallelism "
        r"\(context_parallel_size: 2\).*precompute_ref_log_probs: false.*context_parallel_size: 1",
    ):
        check_axolotl_config(cfg)
    check_axolotl_config({**cfg, "precompute_ref_log_probs": False})
