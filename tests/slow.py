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

#: Tests marked ``slow`` from here rather than in their files, which were being changed in parallel
#: work when the marks were added: node ids without parameters (every parametrisation is slow). Each
#: takes seconds (a checkpoint written and loaded, a Hypothesis search over a model, a compiler run).
#: Move each mark into its file (``@pytest.mark.slow``) and drop it here.
SLOW_ELSEWHERE = frozenset({
    "tests/test_calibrated.py::test_calibrated_ranges_never_have_a_larger_weighted_error_than_the_data_free_ranges",
    "tests/test_calibrated.py::test_error_feedback_lowers_the_output_error_on_correlated_inputs",
    "tests/test_convert.py::test_skip_given_as_one_string_is_one_pattern_not_its_characters",
    "tests/test_convert.py::test_skip_accepts_exact_names_and_globs",
    "tests/test_hardening.py::test_every_level_of_a_table_inside_the_bounds_is_finite_and_normal",
    "tests/test_hardening.py::test_fuzzed_files_either_raise_value_error_leaving_the_model_unchanged_or_load_exactly_what_they_hold",
    "tests/test_kernels.py::test_large_batch_gemm_sums_every_column_block_of_a_long_row",
    "tests/test_serialization.py::test_torch_save_state_dict_loads_with_weights_only",
    "tests/test_serialization.py::test_save_then_load_into_a_converted_model_is_bit_identical",
    "tests/test_serialization.py::test_meta_skeleton_with_non_persistent_buffers_is_refused_before_anything_changes",
    "tests/test_serialization.py::test_tied_embeddings_are_written_once_and_stay_tied",
})


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
    """Marks the tests of :data:`SLOW_ELSEWHERE` as they are collected, and deselects the ``slow``
    tests at the end of collection, after every plugin has marked its items."""

    def pytest_itemcollected(self, item: pytest.Item) -> None:
        if item.nodeid.split("[", 1)[0] in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)

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
