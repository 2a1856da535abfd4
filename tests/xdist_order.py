"""``--dist loadfile`` with the longest module first: a module of slow tests that share a module fixture.

pytest-xdist's loadfile hands each worker whole modules, by default the modules with the most tests
first. A module of a few slow tests that all wait on one expensive module fixture (tests/test_real_lm.py:
a real LM evaluated in five formats, minutes) then comes near the end of the queue, and the run ends
with one worker on that fixture while the others sit idle. Here such modules go first, in collection
order, and every other module follows in xdist's own order (most tests first), so the fixture is built
while the other workers take the rest.

Order only: the same tests run, each module's tests still together and in their order, in one worker.
Active only under ``--dist loadfile`` or ``loadscope`` with xdist's default reordering: the controller
then keeps the workers' collection order (``loadscopereorder`` off), which this module makes xdist's
order with those modules moved to the front.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest

_SCOPED = ("loadfile", "loadscope")
#: set by the controller in each worker's ``workerinput``: order the collection (:func:`longest_first`)
FLAG = "qins_longest_module_first"


def by_module(items: list) -> list[list]:
    """``items`` in blocks of one module each (its node id up to ``::``), modules in order of first
    appearance, each block's items in their order."""
    blocks: dict[str, list] = {}
    for item in items:
        blocks.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    return list(blocks.values())


def longest_first(items: list, grouped: Callable[[object], bool]) -> list:
    """``items`` by module: the modules whose every test is marked slow and one of which uses a shared
    (module, class or package) fixture first, in their order; then the others, most tests first (ties
    keep their order), as xdist orders them. Each module's own items keep their order."""

    def first(group: list) -> bool:
        return all(i.get_closest_marker("slow") is not None for i in group) and any(grouped(i) for i in group)

    ordered = sorted(by_module(items), key=lambda group: (0, 0) if first(group) else (1, -len(group)))
    return [item for group in ordered for item in group]


class LongestModuleFirst:
    """The controller keeps its workers' collection order and tells them to order it (:func:`longest_first`)."""

    def __init__(self, grouped: Callable[[object], bool]) -> None:
        self.grouped = grouped
        self.enabled = False

    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        if hasattr(config, "workerinput"):  # a worker: its dist option reads "no"; the controller decides
            return
        if getattr(config.option, "dist", "no") in _SCOPED and getattr(config.option, "loadscopereorder", False):
            self.enabled = True
            config.option.loadscopereorder = False  # xdist's most-tests-first order is kept by longest_first

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        if self.enabled:
            node.workerinput[FLAG] = True

    @pytest.hookimpl(wrapper=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]):
        result = yield  # after every other plugin (the slow tests' deselection included)
        if getattr(config, "workerinput", {}).get(FLAG):
            items[:] = longest_first(items, self.grouped)
        return result
