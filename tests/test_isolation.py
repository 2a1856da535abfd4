"""The isolation fixtures of ``tests/conftest.py`` catch a test or module that leaves transformers patched."""
from __future__ import annotations

import pytest

from qins.integrations.transformers import compat
from tests import isolation

pytest_plugins = ["pytester"]

INNER_CONFTEST = """
from tests.conftest import (
    pytest_collection_finish, _module_leaves_transformers_unpatched, _test_leaves_transformers_unpatched,
)
"""


def test_differences_name_added_removed_and_rebound_attributes():
    before = {"A": {"x": 1, "y": object()}, "B": {}}
    after = {"A": {"x": before["A"]["x"], "y": object(), "z": 3}, "C": {}}
    assert isolation.differences(before, after) == [
        "A.y changed", "A.z added", "namespace B vanished", "namespace C appeared",
    ]
    assert isolation.differences(before, {"A": {"x": 1}, "B": {}}) == ["A.y removed"]
    assert isolation.differences(before, before) == []


def test_a_warning_registry_written_by_python_is_not_a_patch():
    before = {"mask module": {"f": print}}
    after = {"mask module": {"f": print, "__warningregistry__": {"version": 1}}}
    assert isolation.differences(before, after) == []
    assert isolation.differences(after, before) == []
    assert isolation.differences(before, {"mask module": {"f": len, "__warningregistry__": {}}}) == [
        "mask module.f changed"]


def test_a_deprecation_warning_from_the_mask_module_leaves_the_snapshot_equal():
    import importlib
    import warnings

    mask = importlib.import_module(isolation.MASK_MODULE)
    vars(mask).pop("__warningregistry__", None)  # Python's bookkeeping: warn() creates it again
    before = isolation.namespaces()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        exec("import warnings; warnings.warn('qins test', FutureWarning)", vars(mask))
    assert "__warningregistry__" in vars(mask)
    assert isolation.differences(before, isolation.namespaces()) == []


@pytest.mark.parametrize("leak", ["test", "module"])
def test_isolation_fixtures_fail_the_test_or_module_that_leaves_the_patch(pytester, leak):
    pytester.makeconftest(INNER_CONFTEST)
    if leak == "test":
        pytester.makepyfile("""
            from qins.integrations.transformers import compat
            def test_leaks():
                compat.patch_transformers()
            def test_clean():
                compat.unpatch_transformers()
        """)
    else:
        pytester.makepyfile("""
            import pytest
            from qins.integrations.transformers import compat
            @pytest.fixture(scope="module")
            def patched():
                compat.patch_transformers()
                yield  # no unpatch: the module leaks
            def test_uses_the_patch(patched):
                pass
        """)
    compat.unpatch_transformers()
    try:
        result = pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    finally:
        compat.unpatch_transformers()
    result.assert_outcomes(passed=2 if leak == "test" else 1, errors=1)
    where = "test test_isolation_fixtures_fail" if leak == "test" else "module test_isolation_fixtures_fail"
    result.stdout.fnmatch_lines([f"*{where}*left transformers patched*"])


def test_isolation_fixtures_pass_a_module_that_restores_its_patch(pytester):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile("""
        import pytest
        from qins.integrations.transformers import compat
        @pytest.fixture(scope="module")
        def patched():
            compat.patch_transformers()
            yield
            compat.unpatch_transformers()
        def test_one(patched):
            assert compat._undo is not None
        def test_two(patched):
            assert compat._undo is not None
    """)
    result = pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
