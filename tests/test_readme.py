"""The README's runnable examples (```python blocks) run as written; ```py blocks are sketches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchvis.methods import SPECS, unregister

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code: str) -> None:
    before = list(SPECS)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    finally:  # an example may register a method; the registry is global
        for name in [n for n in SPECS if n not in before]:
            unregister(name)
