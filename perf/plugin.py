"""pytest plugin of the QINS perf suite: the ratio gate, built on pytest-benchmark's own hooks.

Loaded by ``perf/conftest.py`` (so it is active for ``pytest perf`` only, never for ``pytest tests``).
This module holds the hooks only; each delegates to the module of its concern:

* options (:mod:`perf.options`) and session setup: state, CPU identity, mode (:mod:`perf.session`,
  :mod:`perf.state`);
* ``--benchmark-compare`` becomes a gate. The baseline file that pytest-benchmark will compare
  against is located and validated at configure time (:mod:`perf.baseline`, :mod:`perf.cpu`); a
  missing, corrupt or foreign baseline is a usage error with a one-paragraph message saying how to
  create one (no traceback);
* ``perf_gate.check(...)`` (:mod:`perf.fixtures`): each test gates ratio figures (QINS vs its
  interleaved FP32 reference) against the same figures stored in the baseline's ``extra_info``
  (:mod:`perf.gate`); an excess is re-measured once and only a confirmed excess fails the test,
  with a message naming the figure, the change, the limit and the baseline file;
* the same-job A/B: mode "ab", and the A/B confirmation of stored-baseline failures and of the
  absolute backstop (:mod:`perf.ab_session`, :mod:`perf.ab_verdicts`). pytest-benchmark's absolute
  ``--benchmark-compare-fail`` stays as a generous backstop (default ``min:900%``,
  ``--perf-backstop``); its PerformanceRegression is reported without a traceback and turns the
  exit status to 1 only when that A/B confirms it (or cannot run);
* the accuracy gate (:mod:`perf.accuracy_gate`) and the absolute targets (:mod:`perf.targets`);
* fixed threads, gc off while timing (``--benchmark-disable-gc`` forced on), a ``device`` fixture,
  the injected slowdown of the self-check, and the summary, chart and figures table of the run
  (:mod:`perf.summary`).
"""
from __future__ import annotations

import pytest

from perf import ab_session, options, summary
from perf import session as perf_session  # not `session`: the name of the session hooks' argument
from perf.accuracy_gate import ACCURACY_KEY, accuracy_decide
from perf.state import state_of


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark's own (trylast) pytest_configure, which reads the options it sets.
    perf_session.configure(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return perf_session.report_header(state_of(config))


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """A/B round 1, old side first: export the old revision and run its suite before this one."""
    ab_session.start(session)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A/B round 2, this revision first: run the old suite again, then pair and judge."""
    ab_session.finish(session, exitstatus)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """The accuracy gate: a benchmark's accuracy figures against any baseline's, after the test ran."""
    result = yield
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if bench is None:
        return result
    info = getattr(bench, "extra_info", None) or {}
    if ACCURACY_KEY not in info:
        return result
    state = state_of(item.config)
    base = state.compare.accuracy_baseline
    outcomes = accuracy_decide(
        bench.fullname,
        info.get(ACCURACY_KEY),
        base.entry(bench.fullname) if base is not None else None,
        base.label if base is not None else None,
        sqnr_tol_db=item.config.getoption("perf_sqnr_tol_db"),
        cosine_tol=item.config.getoption("perf_cosine_tol"),
        ppl_tol_pct=item.config.getoption("perf_ppl_tol_pct"),
    )
    state.results.accuracy_outcomes.extend(outcomes)
    bad = [o for o in outcomes if o.failed]
    if bad:
        pytest.fail("\n".join(o.message() for o in bad), pytrace=False)
    return result


# --------------------------------------------------------------------------------------------
# pytest-benchmark hooks
# --------------------------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config, machine_info):
    from importlib.metadata import version

    state = state_of(config)
    machine_info["torch"] = version("torch")  # == torch.__version__, without importing torch
    machine_info["qins_perf_threads"] = state.settings.threads
    machine_info["qins_perf_clock"] = state.settings.clock
    machine_info["qins_cpu_key"] = state.machine.key  # informative; "same CPU" is decided from machine_info["cpu"]
    machine_info["qins_cpu_label"] = state.machine.label


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = state_of(config)
    output_json["qins_perf"] = {
        "threads": state.settings.threads,
        "clock": state.settings.clock,
        "budget": state.settings.budget,
        "tolerances": state.settings.tol,
        "inject_slowdown": state.settings.factor,
        "baseline": state.compare.baseline.label if state.compare.baseline else None,
        "mode": state.compare.mode,
        "mode_line": state.compare.mode_line,
        "cpu_key": state.machine.key,
        "accuracy": [
            {
                "test": o.test,
                "figure": o.figure,
                "kind": o.kind,
                "value": o.value,
                "baseline": o.baseline,
                "status": o.status,
            }
            for o in state.results.accuracy_outcomes
        ],
        "gate": [
            {
                "test": o.test,
                "figure": o.figure,
                "value": o.value,
                "confirmation": o.confirmation,
                "baseline": o.baseline,
                "status": o.status,
            }
            for o in state.results.outcomes
        ],
    }


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    # pytest-benchmark already warns about any machine_info difference (the CPU MHz alone varies);
    # the two that change what a ratio means get a clearer note here.
    saved = compared_benchmark.get("machine_info", {})
    for key in ("torch", "qins_perf_threads", "qins_perf_clock"):
        if key in saved and saved.get(key) != machine_info.get(key):
            benchmarksession.logger.warning(
                f"QINS perf: baseline was measured with {key}={saved.get(key)!r}, this run has "
                f"{machine_info.get(key)!r}; ratios may shift."
            )


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config):
    from pytest_benchmark.session import PerformanceRegression

    state = state_of(config)
    try:
        result = yield
    except PerformanceRegression:
        result = None
        summary.backstop_tripped(terminalreporter, config, state)
    summary.report(terminalreporter, state)
    if state.confirm.old is not None:  # not before: the backstop's confirmation above reuses its export
        state.confirm.old.cleanup()
    return result
