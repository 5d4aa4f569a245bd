"""Test-wide settings: offline hubs, the Triton interpreter on machines without CUDA, seeds."""

from __future__ import annotations

import os

# Before anything imports transformers, datasets or triton.
for _var in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels then run in the interpreter, on CPU tensors (slow: tests keep shapes small).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # DeepSpeed (the dev extra installs it) picks its accelerator when it is first imported, which
    # accelerate does whenever it unwraps a model (TRL's DPOTrainer, in every trainer test): the
    # CPU, said here, instead of a "Setting accelerator to CPU" warning in every test process.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _triton_tests_on_the_gpu(request: pytest.FixtureRequest):
    """On a CUDA machine, tests marked ``triton`` create their tensors on the GPU (torch's
    default device inside the test), where the kernels run compiled; elsewhere they run on CPU
    tensors under the interpreter."""
    if torch.cuda.is_available() and request.node.get_closest_marker("triton") is not None:
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(autouse=True, scope="session")
def _count_triton_launches():
    """Session-wide launch totals (tests/instruments.py: launch_totals)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        yield
        return
    from tests.instruments import SESSION_LAUNCHES

    with SESSION_LAUNCHES:
        yield


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The versions this run tested against (CI runs the integrations under two TRL versions)."""
    from importlib import metadata

    # Read from the installed metadata, not by importing: importing trl here, before any test
    # module, would run its package checks before LLaMA-Factory fixes them (see
    # solopo_kernels/integrations/llamafactory/trainer.py), and the header would change the run.
    versions = []
    for name in ("torch", "triton", "transformers", "trl", "datasets", "accelerate"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ["versions: " + ", ".join(versions)]


@pytest.fixture(scope="session")
def smollm2_folder():
    """SmolLM2-135M-Instruct's converted Hugging Face folder (tests/pretrained_models.py)."""
    from solopo_kernels.pretrained import SMOLLM2
    from tests.pretrained_models import folder_or_skip

    return folder_or_skip(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_folder():
    """Gemma-3-270M's converted Hugging Face folder (tests/pretrained_models.py)."""
    from solopo_kernels.pretrained import GEMMA3
    from tests.pretrained_models import folder_or_skip

    return folder_or_skip(GEMMA3)


_conversions = None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Skip the tests marked ``heavy`` unless the ``-m`` expression names them: each costs a
    minute or more of CI's two cores on a real model, and the default run (CI) keeps only the
    cheaper checks of the same code (``pytest -m heavy`` runs them all)."""
    if "heavy" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(
        reason="heavy: a real-model check left out of the default run; run it with pytest -m heavy"
    )
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Start converting, in the background, the real models that the selected tests need and
    the cache does not hold yet (after -m/-k deselection and the heavy skips)."""
    global _conversions
    from tests.pretrained_models import needed_models, start_conversions

    items = [item for item in session.items if item.get_closest_marker("skip") is None]
    _conversions = start_conversions(needed_models(items))


def pytest_sessionfinish(session, exitstatus):
    """Stop a background conversion still running (an interrupted one is redone next time)."""
    if _conversions is not None and _conversions.poll() is None:
        _conversions.terminate()
        _conversions.wait(timeout=60)
