"""SoLoPOTrainer under context parallelism: 2 gloo processes against one (tests/integrations/
cp_worker.py: the attention is an exact all-gather stand-in for ring attention, which needs CUDA),
and the construction-time rules.

Tolerances: the loss to 1e-6 relative, every parameter gradient (after the engine's average over
the group, emulated) to 1e-5 relative to its largest entry; the two ranks' losses are identical.
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
        assert abs(split - single) <= 1e-6 * abs(single), f"{case}: loss {split} vs {single}"
        assert result["ranks_agree"], f"{case}: the ranks returned different losses"
        worst = max(result["grad_errors"].items(), key=lambda item: item[1])
        assert worst[1] <= 1e-5, f"{case}: gradient of {worst[0]} off by {worst[1]:.3g}"


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


def test_packing_with_context_parallelism_is_refused(tmp_path):
    with pytest.raises(ValueError, match="padding_free: not supported with context parallelism"):
        integration.check_combination(_accelerator(2), padding_free=True)
    integration.check_combination(_accelerator(2), padding_free=False)
    integration.check_combination(_accelerator(1), padding_free=True)


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
        ValueError, match="dpo_padding_free: not supported with context_parallel_size"
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
