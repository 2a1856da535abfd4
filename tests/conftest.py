"""Test isolation: no test, and no module, may leave transformers patched (issue 11).

A snapshot of every namespace :mod:`qins.compat` touches is taken when collection finishes.
After each test, and after each module, the namespaces must match it by identity. Tests that
request the module-scoped ``patched`` fixture hold the patch on purpose; they are checked when
their module ends, after that fixture's teardown.
"""
from __future__ import annotations

from typing import Iterator, Optional

import pytest

from tests import isolation

_SNAPSHOT: Optional[dict[str, dict]] = None


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
def _test_leaves_transformers_unpatched(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "patched" not in request.fixturenames:
        _check(f"test {request.node.nodeid}")
