"""The order in which mutmut runs a mutant's tests (``tests/conftest.py``): cheapest first, and a
module with a shared (module-scoped) fixture as one block."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import mutation_order, shares_a_module_fixture


def _items(*nodeids: str) -> list:
    return [SimpleNamespace(nodeid=n) for n in nodeids]


def _order(items: list, seconds: dict[str, float], grouped_modules: set[str]) -> list[str]:
    grouped = lambda item: item.nodeid.split("::")[0] in grouped_modules  # noqa: E731
    return [i.nodeid for i in mutation_order(items, seconds, grouped)]


def test_tests_run_cheapest_first_one_by_one_when_no_module_fixture_is_shared() -> None:
    items = _items("tests/a.py::x", "tests/b.py::y", "tests/a.py::z", "tests/c.py::w")
    seconds = {"tests/a.py::x": 0.1, "tests/a.py::z": 5.0, "tests/b.py::y": 1.0, "tests/c.py::w": 0.5}
    assert _order(items, seconds, set()) == ["tests/a.py::x", "tests/c.py::w", "tests/b.py::y", "tests/a.py::z"]


def test_a_module_with_a_shared_fixture_moves_as_one_block_ranked_by_its_total() -> None:
    items = _items("tests/a.py::x", "tests/b.py::y", "tests/a.py::z", "tests/c.py::w")
    seconds = {"tests/a.py::x": 0.1, "tests/a.py::z": 5.0, "tests/b.py::y": 1.0, "tests/c.py::w": 0.5}
    assert _order(items, seconds, {"tests/a.py"}) == [
        "tests/c.py::w",
        "tests/b.py::y",
        "tests/a.py::x",
        "tests/a.py::z",
    ]


def test_ties_and_the_order_inside_a_block_are_kept() -> None:
    items = _items("tests/a.py::z", "tests/a.py::x", "tests/b.py::y", "tests/c.py::q", "tests/d.py::p")
    seconds = {"tests/a.py::z": 2.0, "tests/a.py::x": 0.0, "tests/b.py::y": 2.0, "tests/d.py::p": 0.0}
    # c and d cost 0 and keep their order; the a block and b tie at 2 s and keep theirs
    assert _order(items, seconds, {"tests/a.py"}) == [
        "tests/c.py::q", "tests/d.py::p", "tests/a.py::z", "tests/a.py::x", "tests/b.py::y"]


@pytest.fixture(scope="module")
def _shared() -> int:
    return 1


def test_module_scoped_fixtures_group_a_module_but_the_isolation_check_does_not(request, _shared) -> None:
    assert shares_a_module_fixture(request.node)
    plain = SimpleNamespace(_fixtureinfo=SimpleNamespace(name2fixturedefs={
        "_module_leaves_transformers_unpatched": [SimpleNamespace(scope="module")],
        "device": [SimpleNamespace(scope="function")], "x": [SimpleNamespace(scope="session")]}))
    assert not shares_a_module_fixture(plain)
    assert not shares_a_module_fixture(SimpleNamespace())
