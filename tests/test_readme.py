"""The README's Python examples run as written, from the installed package, outside the checkout.

Every block fenced as ```python is executed, in order, each in a fresh namespace and with the
working directory set to a temporary directory outside the checkout; blocks fenced as ```py are
illustrations that need outside resources (a download, a checkpoint path) and are not run. The
examples may use only the installed package (``qins``, ``qins.testing``), never ``tests.*``, which
is not packaged.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples() -> None:
    assert BLOCKS, "no ```python block found in README.md"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_uses_only_the_installed_package(index: int) -> None:
    imports = re.findall(r"^\s*(?:from|import)\s+(tests|perf)\b", BLOCKS[index], flags=re.M)
    assert not imports, f"README python block {index} imports {imports}: not part of the installed package"


@pytest.mark.slow  # each block builds, converts and saves models
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not Path.cwd().resolve().is_relative_to(ROOT), "the examples must run outside the checkout"
    code = compile(BLOCKS[index], f"README.md[python block {index}]", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README is ours
