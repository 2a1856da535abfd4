"""Test isolation: no test, and no module, may leave transformers patched (issue 11).

A snapshot of every namespace :mod:`qins.compat` touches is taken when collection finishes.
After each test, and after each module, the namespaces must match it by identity. Modules that
define a module-scoped ``patched`` fixture hold the patch across their tests on purpose; they are
checked when the module ends, after that fixture's teardown.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import pytest

import torch

from tests import isolation

# Triton's own language helpers (``tl.zeros_like``, ...) are jitted when ``triton.language`` is
# first imported, interpreted or compiled depending on TRITON_INTERPRET *at that moment*. Set it
# before any test module (or torch.compile) can import triton, so that the interpreter tests of
# tests/test_triton.py hold in any test order. Without a GPU, interpreting is the only way to run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SNAPSHOT: Optional[dict[str, dict]] = None


def pytest_configure(config: pytest.Config) -> None:
    """Under mutmut: load the native kernels once, in the process that mutmut forks workers from.

    A worker killed by mutmut's timeout while torch's extension loader holds its build lock
    would leave the lock behind and hang every later worker. Loaded up front, workers inherit
    the module and never take the lock. Mutants of the build code itself (``qins.kernels.cpu.build``)
    run against a private copy of the build directory instead, so they cannot disturb the shared one.
    """
    mutant = os.environ.get("MUTANT_UNDER_TEST")
    if mutant is None:
        return
    if mutant.startswith("qins.kernels.cpu.build."):
        import shutil
        import tempfile

        from qins.kernels.cpu import build

        private, shared = Path(tempfile.mkdtemp(prefix="qins-mutant-build-")), build.build_directory()
        if shared.is_dir():
            shutil.copytree(shared, private / shared.name, ignore=shutil.ignore_patterns("lock"))
        os.environ["TORCH_EXTENSIONS_DIR"] = str(private)
    else:
        import qins.kernels

        qins.kernels.native_module()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (``nox -s mutation``), run a mutant's tests fastest first.

    mutmut runs each mutant's tests with ``-x``; ordering them by the durations its stats pass
    recorded (``mutmut-stats.json`` in its working directory) makes the cheapest failing test the
    one that stops the run. Order only: the same tests run. Outside mutmut, nothing changes.
    """
    if os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "fail", "mutant_generation"):
        return
    stats = Path("mutmut-stats.json")
    if not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def pytest_collection_finish(session: pytest.Session) -> None:
    global _SNAPSHOT
    _SNAPSHOT = isolation.baseline()


def _check(where: str) -> None:
    assert _SNAPSHOT is not None, "the collection-time snapshot is missing"
    diff = isolation.differences(_SNAPSHOT, isolation.namespaces())
    if diff:
        pytest.fail(f"{where} left transformers patched: " + "; ".join(diff), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_transformers_unpatched(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    _check(f"module {request.node.name}")


@pytest.fixture(autouse=True)
def _mutmut_maps_every_registering_test() -> None:
    """Under mutmut's stats pass only: forget the process-wide transformers registration before each test.

    ``register_with_transformers`` builds the QINS config and quantizer classes once per process,
    so mutmut would map that code to the first test that happened to register and never to the
    tests that exercise the classes (``tests/test_persistence.py``, whose loads run in a child
    process). Rebuilding per test maps it to every test that registers. Behaviour is unchanged:
    transformers keeps the first registration, which ``register_with_transformers`` reuses.
    """
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        import qins.hf

        qins.hf._registered = None


@pytest.fixture(autouse=True)
def _test_leaves_transformers_unpatched(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not hasattr(request.module, "patched"):  # a module-scoped patch is checked when its module ends
        _check(f"test {request.node.nodeid}")
