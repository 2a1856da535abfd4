"""The README's Python examples run as written.

Every block fenced as ```python is executed, in order, in one namespace; blocks fenced as ```py
are illustrations that need outside resources (a checkpoint path) and are not run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples() -> None:
    assert BLOCKS, "no ```python block found in README.md"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index: int) -> None:
    code = compile(BLOCKS[index], f"README.md[python block {index}]", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README is ours
