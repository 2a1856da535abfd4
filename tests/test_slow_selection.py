"""``pytest tests`` leaves out the tests marked ``slow`` unless ``--run-slow``, ``-m`` or a node id
asks for them (``tests/slow.py``), and CI's invocation runs every test."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
from tests import slow


def pytest_addoption(parser):
    slow.add_option(parser)


def pytest_configure(config):
    config.pluginmanager.register(slow.SlowDeselection(), "qins-slow-deselection")
"""

SUITE = """
import pytest


@pytest.mark.slow
def test_marked():
    pass


@pytest.mark.parametrize("n", [1, 2])
def test_fast(n):
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


@pytest.mark.parametrize(
    "args, passed, deselected",
    [
        ((), 2, 1),  # the inner loop
        (("--run-slow",), 3, 0),  # CI
        (("-m", "slow"), 1, 2),  # -m decides
        (("-m", "not slow"), 2, 1),
        (("test_suite.py::test_marked",), 1, 0),  # named by its node id
        (("test_suite.py::test_fast",), 2, 0),
    ],
)
def test_slow_tests_run_only_when_asked_for(suite: pytest.Pytester, args: tuple[str, ...], passed: int,
                                            deselected: int) -> None:
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=passed, deselected=deselected)
    header = "tests marked slow are deselected" in result.stdout.str()
    assert header == (not args or args[0].startswith("test_suite.py"))
