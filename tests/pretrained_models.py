"""The real pretrained models of the tests (``solopo_kernels.pretrained``): their converted
folders, skipped where the wheels are not installed, except in CI, which installs them (there a
missing wheel fails the test instead of hiding it).

Converting takes about 30 s (SmolLM2) and 80-90 s (Gemma) of one core. When the selected tests
need a model that is not converted yet, :func:`start_conversions` converts it in a background
process from the start of the session, on the core that the mostly single-threaded tests leave
idle; a test that needs it before it is done waits on the cache's file lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from solopo_kernels.pretrained import (
    GEMMA3,
    SMOLLM2,
    ModelNotInstalledError,
    cache_root,
    is_converted,
    pretrained_path,
)

#: The fixture (tests/conftest.py) that gives each model's folder.
FIXTURES = {"smollm2_folder": SMOLLM2, "gemma3_folder": GEMMA3}


def folder_or_skip(name: str) -> Path:
    """The converted folder of ``name`` (converted on first use into the default cache)."""
    try:
        return pretrained_path(name)
    except ModelNotInstalledError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{error} (CI installs it)")


def needed_models(items: Sequence[pytest.Item]) -> list[str]:
    """The models the ``items`` use, in the order of their first use."""
    names: list[str] = []
    for item in items:
        for fixture, name in FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()) and name not in names:
                names.append(name)
    return names


def start_conversions(names: Sequence[str]) -> subprocess.Popen | None:
    """Convert the installed, unconverted ``names`` in a background process (its output goes to
    ``.tests-conversion.log`` in the cache); ``None`` when there is nothing to do."""
    todo = [name for name in names if not is_converted(name)]
    todo = [name for name in todo if _installed(name)]
    if not todo:
        return None
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tests-conversion.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "solopo_kernels.pretrained", *todo],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _installed(name: str) -> bool:
    from solopo_kernels.pretrained import check_installed

    try:
        check_installed(name)
    except ModelNotInstalledError:
        return False
    return True
