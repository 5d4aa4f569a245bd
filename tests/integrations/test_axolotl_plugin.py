"""The Axolotl plugin's own logic: config checks, registration, training-argument mapping.

These run without Axolotl (CI does not install it). The two tests about the Axolotl trainer class
split on whether Axolotl imports: one of them is skipped, with the reason, on every machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from types import SimpleNamespace

import pytest

pytest.importorskip("pydantic", reason="pydantic (an Axolotl dependency) is not installed")

from solopo_kernels.integrations import axolotl as plugin_module  # noqa: E402
from solopo_kernels.integrations.args import SOLOPO_ARGUMENT_NAMES, SoLoPOArguments  # noqa: E402


def _distribution_installed(name: str) -> bool:
    """Whether the distribution is installed (a folder named like it on sys.path is not)."""
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


AXOLOTL_INSTALLED = _distribution_installed("axolotl")

BASE = {"rl": "dpo", "solopo": True, "solopo_loss_type": "simpo", "solopo_alpha": 2.0}


def _resolve(dotted: str) -> object:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_plugin_paths_resolve_to_the_args_model_and_the_training_args_mixin():
    plugin = plugin_module.SoLoPOPlugin()
    assert _resolve(plugin.get_input_args()) is plugin_module.SoLoPOArgs
    mixin = _resolve(plugin.get_training_args_mixin())
    assert mixin is SoLoPOArguments and dataclasses.is_dataclass(mixin)


def test_every_training_argument_has_a_yaml_key():
    assert sorted(plugin_module.YAML_TO_TRAINING_ARGS.values()) == sorted(SOLOPO_ARGUMENT_NAMES)
    assert all(key.startswith("solopo_") for key in plugin_module.YAML_TO_TRAINING_ARGS)


def test_valid_config_parses():
    args = plugin_module.SoLoPOArgs.model_validate({**BASE, "solopo_max_long_length": 512})
    assert args.solopo_loss_type == "simpo" and args.solopo_max_long_length == 512


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"rl": "ipo"}, "rl: solopo needs rl: dpo"),
        ({"rl": "simpo"}, "rl: solopo needs rl: dpo"),
        ({"dpo_loss_type": ["hinge"]}, "dpo_loss_type"),
        ({"pad_to_multiple_of": 8}, "pad_to_multiple_of"),
        (
            {
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            "use_reentrant",
        ),
        ({"solopo_max_long_length": 1}, "solopo_max_long_length"),
        ({"solopo_alpha": -1.0}, "solopo_alpha"),
        ({"solopo_loss_type": "kto"}, "solopo_loss_type"),
        ({"solopo_ra_gradient": "short"}, "solopo_ra_gradient"),
        ({"solopo_nll_average": "batch"}, "solopo_nll_average"),
        ({"solopo_nll_average": "token", "solopo_loss_type": "simpo"}, "solopo_nll_average"),
    ],
)
def test_invalid_config_is_rejected(extra, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        plugin_module.SoLoPOArgs.model_validate({**BASE, **extra})


def test_plugin_is_inert_without_solopo():
    plugin = plugin_module.SoLoPOPlugin()
    cfg = {"rl": "kto", "pad_to_multiple_of": 8}
    plugin_module.SoLoPOArgs.model_validate(cfg)  # no SoLoPO checks
    plugin.register(cfg)
    assert "trainer_cls" not in cfg
    assert plugin.get_training_args(SimpleNamespace(solopo=None)) is None
    plugin.post_trainer_create(SimpleNamespace(solopo=None), trainer=object())


def test_register_routes_to_the_solopo_trainer_and_undoes_it_on_a_rejected_config():
    plugin = plugin_module.SoLoPOPlugin()
    cfg = dict(BASE)
    plugin.register(cfg)
    assert cfg["trainer_cls"] == "solopo_kernels.integrations.axolotl.AxolotlSoLoPOTrainer"
    plugin.on_config_validation_error(cfg)
    assert "trainer_cls" not in cfg
    custom = {**BASE, "trainer_cls": "my_pkg.MyTrainer"}
    plugin.register(custom)
    assert custom["trainer_cls"] == "my_pkg.MyTrainer"  # kept; checked after the trainer exists


def test_training_args_map_yaml_keys_to_a_solopo_config(tmp_path):
    pytest.importorskip("trl", reason="the trl extra is not installed")
    from solopo_kernels.integrations.trl import SoLoPOConfig

    cfg = SimpleNamespace(
        solopo=True,
        solopo_alpha=2.0,
        solopo_loss_type="orpo",
        solopo_ra_target="both",
        solopo_ra_distance="squared",
        solopo_ra_use_reference=None,
        solopo_ra_gradient="long",
        solopo_nll_average="token",
        solopo_long_prompt_field="context_long",
        solopo_max_long_length=300,
        solopo_gamma=None,
    )
    kwargs = plugin_module.SoLoPOPlugin().get_training_args(cfg)
    assert kwargs == {
        "solopo_alpha": 2.0,
        "solopo_loss_type": "orpo",
        "solopo_ra_target": "both",
        "solopo_ra_distance": "squared",
        "solopo_ra_gradient": "long",
        "solopo_nll_average": "token",
        "long_prompt_column": "context_long",
        "max_long_length": 300,
    }
    config = SoLoPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kwargs
    )
    options = config.solopo_options
    assert (
        options.loss_type,
        options.alpha,
        options.ra_target,
        options.ra_distance,
        options.ra_gradient,
        options.nll_average,
    ) == ("orpo", 2.0, "both", "squared", "long", "token")


def test_post_trainer_create_refuses_a_trainer_that_is_not_solopo():
    with pytest.raises(RuntimeError, match="not a SoLoPOTrainer"):
        plugin_module.SoLoPOPlugin().post_trainer_create(
            SimpleNamespace(solopo=True), trainer=object()
        )


@pytest.mark.skipif(
    not AXOLOTL_INSTALLED, reason="Axolotl is not installed (see examples/axolotl/README.md)"
)
def test_axolotl_trainer_class_combines_solopo_and_axolotl_dpo():
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
    from axolotl.integrations.base import BasePlugin

    from solopo_kernels.integrations.trl import SoLoPOTrainer

    cls = plugin_module.AxolotlSoLoPOTrainer
    assert issubclass(cls, SoLoPOTrainer) and issubclass(cls, AxolotlDPOTrainer)
    assert cls.__mro__.index(SoLoPOTrainer) < cls.__mro__.index(AxolotlDPOTrainer)
    assert isinstance(plugin_module.SoLoPOPlugin(), BasePlugin)


@pytest.mark.skipif(
    AXOLOTL_INSTALLED, reason="Axolotl is installed: the trainer class is tested instead"
)
def test_axolotl_trainer_class_needs_axolotl():
    with pytest.raises(ImportError, match="axolotl"):
        plugin_module.AxolotlSoLoPOTrainer  # noqa: B018
