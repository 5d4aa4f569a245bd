"""The README's TRL section runs as written: every ``python`` block of the section
"Train with it: TRL, Axolotl and LLaMA-Factory" is executed, in order, in one namespace, offline,
in a scratch working directory (the example writes its ``output_dir`` there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the trl extra is not installed")

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Train with it: TRL, Axolotl and LLaMA-Factory"


def python_blocks(text: str, section: str) -> list[str]:
    """The ``python`` code blocks between the ``section`` heading and the next ``## `` heading."""
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    body = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_the_trl_section_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text(), SECTION)
    assert blocks, f"no python block under {SECTION!r}"
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert trainer.ref_model is None  # simpo: reference-free
    printed = capsys.readouterr().out.split()
    assert len(printed) >= 4 and all(float(x) == float(x) for x in printed[-4:])  # finite numbers
