"""The fast inner loop: ``pytest tests`` leaves out the tests marked ``slow`` unless asked.

A test is marked ``slow`` when it takes seconds on its own (a real pretrained model, a native
build, Inductor, a perf suite or a model load in a subprocess, ...); ``pytest tests`` then runs in
about two minutes on two cores. CI runs every test: ``.ci/run``, the nox sessions and mutmut pass
:data:`RUN_SLOW`. The slow tests are also run when

* ``-m`` is given (the expression decides, e.g. ``-m slow`` runs only them), or
* a test is named on the command line by its node id (``pytest tests/test_x.py::test_y``).

Deselected tests are reported as such by pytest ("N deselected"), never as passed.
"""
from __future__ import annotations

import pytest

#: the option that runs the slow tests too
RUN_SLOW = "--run-slow"


def add_option(parser: pytest.Parser) -> None:
    parser.addoption(RUN_SLOW, action="store_true", default=False,
                     help="also run the tests marked slow (left out of a plain `pytest tests`; CI passes it)")


def _named(config: pytest.Config) -> list[str]:
    """Node ids named on the command line (arguments with ``::``), without their parameter part."""
    return [str(arg).split("[", 1)[0] for arg in config.args if "::" in str(arg)]


def _is_named(item: pytest.Item, named: list[str]) -> bool:
    """Whether ``item`` (or its class) is one of the ``named`` node ids (relative to the root, or ending in it)."""
    base = item.nodeid.split("[", 1)[0]
    return any(base == n or base.startswith(n + "::") or n.endswith("/" + base) for n in named)


class SlowDeselection:
    """Deselects the ``slow`` tests at the end of collection, after every plugin has marked its items."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if config.getoption("run_slow") or config.getoption("markexpr"):
            return
        named = _named(config)
        slow = [i for i in items if i.get_closest_marker("slow") is not None and not _is_named(i, named)]
        if slow:
            config.hook.pytest_deselected(items=slow)
            left = set(map(id, slow))
            items[:] = [i for i in items if id(i) not in left]

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        if config.getoption("run_slow") or config.getoption("markexpr"):
            return None
        return f"qins: tests marked slow are deselected ({RUN_SLOW} runs them, as CI does)"
