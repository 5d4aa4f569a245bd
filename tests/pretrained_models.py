"""The real pretrained models of the tests (``solopo_kernels.pretrained``): their converted
folders, skipped where the wheels are not installed, except in CI, which installs them (there a
missing wheel fails the test instead of hiding it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from solopo_kernels.pretrained import ModelNotInstalledError, pretrained_path


def folder_or_skip(name: str) -> Path:
    """The converted folder of ``name`` (converted on first use into the default cache)."""
    try:
        return pretrained_path(name)
    except ModelNotInstalledError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{error} (CI installs it)")
