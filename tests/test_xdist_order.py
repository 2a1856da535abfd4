"""tests/xdist_order.py: under --dist loadfile the long module (slow tests on one shared fixture) comes first."""
from __future__ import annotations

from dataclasses import dataclass

from tests.xdist_order import longest_first


@dataclass
class _Item:
    nodeid: str
    slow: bool = False
    shared: bool = False

    def get_closest_marker(self, name: str):
        return object() if name == "slow" and self.slow else None


def _ids(items: list) -> list[str]:
    return [i.nodeid for i in items]


def test_a_module_of_slow_tests_on_a_shared_fixture_goes_first_and_the_rest_most_tests_first():
    items = [
        _Item("a.py::x"),
        _Item("b.py::x"), _Item("b.py::y"), _Item("b.py::z"),
        _Item("c.py::x"), _Item("c.py::y"),
        _Item("lm.py::x", slow=True, shared=True), _Item("lm.py::y", slow=True),
        _Item("d.py::x"), _Item("d.py::y"),
    ]
    out = longest_first(items, grouped=lambda i: i.shared)
    assert _ids(out) == ["lm.py::x", "lm.py::y", "b.py::x", "b.py::y", "b.py::z", "c.py::x", "c.py::y",
                         "d.py::x", "d.py::y", "a.py::x"]


def test_a_module_with_a_fast_test_or_without_a_shared_fixture_keeps_xdists_place():
    items = [
        _Item("big.py::x"), _Item("big.py::y"), _Item("big.py::z"),
        _Item("mixed.py::x", slow=True, shared=True), _Item("mixed.py::y"),
        _Item("alone.py::x", slow=True),
    ]
    out = longest_first(items, grouped=lambda i: i.shared)
    assert _ids(out) == ["big.py::x", "big.py::y", "big.py::z", "mixed.py::x", "mixed.py::y", "alone.py::x"]
