"""Test isolation: no test, and no module, may leave transformers patched.

A snapshot of every namespace :mod:`qins.integrations.transformers.compat` touches is taken when collection finishes.
After each test, and after each module, the namespaces must match it by identity. Modules that
define a module-scoped ``patched`` fixture hold the patch across their tests on purpose; they are
checked when the module ends, after that fixture's teardown.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests import isolation, mutmut_depth, slow, xdist_order

if "mutmut" in sys.modules:  # inside a mutmut run: its max_stack_depth, fixed (tests/mutmut_depth.py)
    mutmut_depth.install()

# Triton's own language helpers (``tl.zeros_like``, ...) are jitted when ``triton.language`` is
# first imported, interpreted or compiled depending on TRITON_INTERPRET *at that moment*. Set it
# before any test module (or torch.compile) can import triton, so that the interpreter tests of
# tests/test_triton.py hold in any test order. Without a GPU, interpreting is the only way to run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the cores: each gets its share of torch threads. OpenMP regions (torch's
# and the native kernels') with more threads than free cores wait at every barrier for a descheduled
# thread: a 576x1536 layer took 15.6 ms a call at 2 threads beside another busy process, 0.58 ms at 1.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if os.environ.get("PYTEST_XDIST_WORKER") and _WORKERS > 1:
    # imported only here: outside xdist workers conftest's own load stays without ``import qins``
    from qins.testing.cores import usable_cores

    torch.set_num_threads(max(1, usable_cores() // _WORKERS))

_SNAPSHOT: dict[str, dict] | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    slow.add_option(parser)


def pytest_configure(config: pytest.Config) -> None:
    """The slow tests' deselection (:mod:`tests.slow`); under mutmut, load the native kernels once,
    in the process that mutmut forks workers from.

    A worker killed by mutmut's timeout while torch's extension loader holds its build lock
    would leave the lock behind and hang every later worker. Loaded up front, workers inherit
    the module and never take the lock. Mutants of the build code itself (``qins.kernels.cpu.build``)
    run against a private copy of the build directory instead, so they cannot disturb the shared one.
    """
    config.pluginmanager.register(slow.SlowDeselection(), "qins-slow-deselection")
    # --dist loadfile: a module of slow tests on one shared fixture (the real LM) starts first (tests/xdist_order.py)
    config.pluginmanager.register(xdist_order.LongestModuleFirst(shares_a_module_fixture), "qins-xdist-order")
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


#: written by mutmut's stats pass (in its working directory, ``mutants/``): each test's setup and
#: teardown seconds, which mutmut's own ``duration_by_test`` leaves out (it times the call only)
FIXTURE_DURATIONS = Path("mutmut-fixture-durations.json")
_fixture_seconds: dict[str, float] = {}


def _under_a_mutant() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST", "") not in ("", "stats", "fail", "mutant_generation")


def _in_stats_pass() -> bool:
    """mutmut's stats pass: it maps tests to the functions they reach."""
    return os.environ.get("MUTANT_UNDER_TEST") == "stats"


#: module-scoped fixtures that cost nothing to set up again (the isolation check below)
_CHEAP_MODULE_FIXTURES = frozenset({"_module_leaves_transformers_unpatched"})


def shares_a_module_fixture(item) -> bool:
    """True if ``item`` uses a module-, class- or package-scoped fixture other than the cheap
    isolation check: its module's items must then run together, or that fixture is set up twice."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.items() if info is not None else ()
    return any(d.scope in ("class", "module", "package") for name, ds in defs if name not in _CHEAP_MODULE_FIXTURES
               for d in ds)


def mutation_order(items: list, seconds: dict[str, float], grouped=shares_a_module_fixture) -> list:
    """``items`` cheapest first by ``seconds`` (unknown ids cost 0; ties keep their order).

    A module any of whose items is ``grouped`` moves as one block, ranked by the sum of its items'
    seconds, its own order kept, so that no shared module fixture is set up twice; the items of
    other modules are ranked one by one.
    """
    units = []
    for group in xdist_order.by_module(items):
        units.extend([group] if any(grouped(i) for i in group) else [[i] for i in group])
    units.sort(key=lambda unit: sum(seconds.get(i.nodeid, 0.0) for i in unit))  # stable: ties keep their order
    return [item for unit in units for item in unit]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (``nox -s mutation``), run a mutant's tests cheapest first (:func:`mutation_order`).

    mutmut runs each mutant's tests with ``-x``, so the first failing test ends the run. Tests are
    ranked by the seconds its stats pass measured: the calls (``mutmut-stats.json``) plus setup
    and teardown (:data:`FIXTURE_DURATIONS`, written by this file during that pass), since a
    module fixture that builds and saves models costs more than all its tests' calls.
    Order only: the same tests run. Outside mutmut, nothing changes.
    """
    if not _under_a_mutant():
        return
    seconds: dict[str, float] = {}
    for path, key in ((Path("mutmut-stats.json"), "duration_by_test"), (FIXTURE_DURATIONS, None)):
        if path.exists():
            data = json.loads(path.read_text())
            for nodeid, s in (data[key] if key else data).items():
                seconds[nodeid] = seconds.get(nodeid, 0.0) + s
    items[:] = mutation_order(items, seconds)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Under mutmut's stats pass only: add up each test's setup and teardown seconds."""
    if report.when in ("setup", "teardown") and _in_stats_pass():
        _fixture_seconds[report.nodeid] = _fixture_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under mutmut's stats pass: merge this pass's setup/teardown seconds into :data:`FIXTURE_DURATIONS`
    (a pass over new tests only must not forget the others)."""
    if _fixture_seconds and _in_stats_pass():
        known = json.loads(FIXTURE_DURATIONS.read_text()) if FIXTURE_DURATIONS.exists() else {}
        FIXTURE_DURATIONS.write_text(json.dumps({**known, **_fixture_seconds}, indent=0, sort_keys=True))


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
    if _in_stats_pass():
        from qins.integrations.transformers import registration

        registration._registered = None


@pytest.fixture(autouse=True)
def _test_leaves_transformers_unpatched(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not hasattr(request.module, "patched"):  # a module-scoped patch is checked when its module ends
        _check(f"test {request.node.nodeid}")
