"""The QINS perf suite's pytest configuration: loads the gate plugin (perf/plugin.py) and its fixtures.

Active only when perf/ is collected (``pytest perf``), so ``pytest tests`` never sees it.
"""
from perf.fixtures import (  # noqa: F401  (pytest collects fixtures by name)
    _perf_gc_between_tests,
    _perf_torch_settings,
    device,
    inject_factor,
    perf_gate,
    perf_state,
)
from perf.models import e2e_models, e2e_prompt  # noqa: F401  (session fixtures shared by perf tests)
from perf.plugin import (  # noqa: F401  (pytest collects hooks by name)
    pytest_addoption,
    pytest_benchmark_compare_machine_info,
    pytest_benchmark_update_json,
    pytest_benchmark_update_machine_info,
    pytest_configure,
    pytest_report_header,
    pytest_runtest_call,
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
)
