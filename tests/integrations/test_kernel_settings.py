"""The kernel's settings from the trainer: one ``head_kernel`` field (a :class:`HeadKernel`, a
dict, or its JSON), checked when the config is built, and passed unchanged by the patched
forward to the log-prob kernel; the Axolotl key ``solopo_head_kernel``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels import KernelOptions  # noqa: E402
from solopo_kernels.integrations import model_patch  # noqa: E402
from solopo_kernels.integrations.args import HeadKernel  # noqa: E402
from tests.integrations import common  # noqa: E402

SETTINGS = {"backend": "torch", "chunk_size": [16, 32], "options": {"saved_logits_bytes": 4096}}
EXPECTED = HeadKernel("torch", (16, 32), KernelOptions(saved_logits_bytes=4096))


@pytest.mark.parametrize("given", [SETTINGS, json.dumps(SETTINGS), EXPECTED], ids=str)
def test_the_field_takes_a_dict_its_json_or_a_head_kernel(tmp_path, given):
    args = common.config(tmp_path, head_kernel=given)
    assert args.head_kernel_settings == EXPECTED
    assert json.loads(args.to_json_string())["head_kernel"]["chunk_size"] == [16, 32]
    assert common.config(tmp_path).head_kernel_settings == HeadKernel()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ({"backend": "cuda"}, ValueError, r"head_kernel.backend: expected one of .*'cuda'"),
        ({"chunk_size": 0}, ValueError, r"head_kernel.chunk_size: expected None, a positive int"),
        (
            {"options": {"saved_bytes": 1}},
            ValueError,
            r"head_kernel.options: unknown key 'saved_bytes'",
        ),
        (
            {"options": {"saved_logits_bytes": -1}},
            ValueError,
            r"saved_logits_bytes: expected an int >= 0",
        ),
        (
            {"options": 3},
            TypeError,
            r"head_kernel.options: expected a solopo_kernels.KernelOptions",
        ),
        ({"chunks": 4}, ValueError, r"head_kernel: unknown key 'chunks'"),
        (7, TypeError, r"head_kernel: expected a HeadKernel, a dict"),
        ("{not json", ValueError, r"head_kernel: expected a JSON object"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(tmp_path, value, error, match):
    with pytest.raises(error, match=match):
        common.config(tmp_path, head_kernel=value)


def test_the_patched_forward_passes_the_settings_unchanged_to_the_kernel(tmp_path, monkeypatch):
    seen = []
    kernel = model_patch.response_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(model_patch, "response_logprobs", spy)
    trainer = common.trainer(tmp_path, head_kernel=SETTINGS, solopo_loss_type="simpo", ref=None)
    loss = trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1]))
    assert len(seen) == 2  # the short batch and the long batch
    for kwargs in seen:
        assert kwargs == {
            "temperature": 1.0,
            "backend": "torch",
            "chunk_size": (16, 32),
            "kernel_options": KernelOptions(saved_logits_bytes=4096),
        }
    # The same loss as with the defaults (the settings change the route, not the values).
    plain = common.trainer(tmp_path / "plain", solopo_loss_type="simpo", ref=None)
    expected = plain.compute_loss(plain.model, common.batch(plain, [0, 1]))
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())


def test_the_axolotl_key_is_checked_and_reaches_the_training_arguments():
    from solopo_kernels.integrations.axolotl import check_axolotl_config, training_args_from_config

    cfg = {"rl": "dpo", "solopo": True, "solopo_head_kernel": SETTINGS}
    check_axolotl_config(cfg)
    assert training_args_from_config(cfg)["head_kernel"] == SETTINGS
    with pytest.raises(ValueError, match=r"solopo_head_kernel.backend: expected one of"):
        check_axolotl_config({**cfg, "solopo_head_kernel": {"backend": "cuda"}})


def test_the_command_line_takes_the_settings_as_json(tmp_path):
    from transformers import HfArgumentParser

    from solopo_kernels.integrations.trl import SoLoPOConfig

    (args,) = HfArgumentParser(SoLoPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "False", "--report_to", "none"]
        + ["--head_kernel", json.dumps(SETTINGS)]
    )
    assert args.head_kernel_settings == EXPECTED
