"""The perf suite's fixtures: the gate handle every benchmark reports to, the device, fixed settings.

``perf/conftest.py`` imports them by name, so they exist for ``pytest perf`` only.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Mapping

import pytest

from perf.ab_session import confirm_by_ab
from perf.gate import GATE_KEY, RULES_KEY, Outcome, Rule, decide, rule_to_json
from perf.state import PerfState, state_of
from perf.targets import speed_targets_asserted


@pytest.fixture(scope="session")
def perf_state(request: pytest.FixtureRequest) -> PerfState:
    """The session's :class:`~perf.state.PerfState` (settings, CPU, mode, results)."""
    return state_of(request.config)


@pytest.fixture(scope="session")
def device():
    """The device the suite runs on: CUDA when available, else CPU. Timed callables sync on CUDA."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def _perf_torch_settings(perf_state: PerfState):
    """Fixed threads (``--perf-threads``), one inter-op thread and a fixed seed for the whole run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(perf_state.settings.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (or parallel work already ran); harmless
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _perf_gc_between_tests():
    """Collect garbage around each test, so that no test times another's garbage (gc is off while timing)."""
    gc.collect()
    yield
    gc.collect()


@pytest.fixture(scope="session")
def inject_factor(perf_state: PerfState) -> float:
    """The injected slowdown factor (1.0 = none). See ``--perf-inject-slowdown``."""
    return perf_state.settings.factor


class GateHandle:
    """What a test uses: ``check`` gated figures, ``record`` plain ones, ``lookup`` earlier ones."""

    def __init__(self, state: PerfState, request: pytest.FixtureRequest) -> None:
        self.state = state
        self.request = request

    @property
    def tol(self) -> dict:
        return self.state.settings.tol

    @property
    def budget(self) -> float:
        return self.state.settings.budget

    def lookup(self, key: str) -> dict | None:
        return self.state.results.by_key.get(key)

    def record(self, benchmark, figures: Mapping[str, object], key: str | None = None) -> None:
        info = benchmark.extra_info
        info.update(figures)
        if self.state.settings.factor != 1.0:
            info["inject_slowdown"] = self.state.settings.factor
        if key:
            info["key"] = key
            self.state.results.by_key[key] = info
        stats = getattr(benchmark, "stats", None)
        median = None
        if stats is not None and stats.stats.data:
            median = stats.stats.median
        self.state.results.records[benchmark.fullname] = {
            "group": benchmark.group,
            "name": benchmark.name,
            "extra_info": info,
            "median": median,
        }

    def speed_target(self, benchmark, kernel: str, target: str, missed: str | None) -> None:
        """An absolute speed target of ``benchmark``, run on ``kernel``: ``target`` says what it is,
        ``missed`` is the message when it was missed after its re-measure, else None. Recorded for the
        summary (met or missed) and ``extra_info``; a miss fails the test only under ``--perf-targets=on``."""
        status = "met" if missed is None else "missed"
        self.state.results.target_results.append(
            (benchmark.fullname, kernel, status, target if missed is None else missed)
        )
        benchmark.extra_info.setdefault("speed_targets", []).append({"target": target, "status": status,
                                                                       "kernel": kernel, "missed": missed})
        if missed is not None and speed_targets_asserted(self.state.settings.targets):
            pytest.fail(missed, pytrace=False)

    def accuracy_target(self, benchmark, what: str, met: bool) -> None:
        """An absolute accuracy target of ``benchmark`` (e.g. a perplexity increase against int8's),
        stated met or missed in the summary and ``extra_info``; a miss fails the test only under
        ``--perf-targets=on``. Regressions against the baseline are gated separately (accuracy gate)."""
        status = "met" if met else "missed"
        self.state.results.accuracy_target_results.append((benchmark.fullname, status, what))
        benchmark.extra_info.setdefault("accuracy_targets", []).append({"target": what, "status": status})
        if not met and speed_targets_asserted(self.state.settings.targets):
            pytest.fail(f"accuracy target missed: {what}", pytrace=False)

    def check(
        self,
        benchmark,
        figures: Mapping[str, float],
        rules: Mapping[str, Rule],
        remeasure: Callable[[], Mapping[str, float]] | None = None,
        key: str | None = None,
    ) -> list[Outcome]:
        """Record ``figures``, gate those named in ``rules``; fail the test on a confirmed regression."""
        self.record(benchmark, figures, key=key)
        if benchmark.disabled:
            return []
        benchmark.extra_info[GATE_KEY] = sorted(rules)
        benchmark.extra_info[RULES_KEY] = {k: rule_to_json(r) for k, r in rules.items()}
        base = self.state.compare.baseline
        entry = base.entry(benchmark.fullname) if base is not None else None
        outcomes = decide(
            benchmark.fullname,
            {k: float(figures[k]) for k in rules},
            rules,
            entry,
            base.label if base is not None else None,
            remeasure,
        )
        self.state.results.outcomes.extend(outcomes)
        limits = {
            o.figure: {"baseline": o.baseline, "limit": o.limit, "worse": o.rule.worse, "status": o.status}
            for o in outcomes
            if o.baseline is not None
        }
        if limits:
            benchmark.extra_info["qins_gate_limits"] = limits
        confirmations = {o.figure: o.confirmation for o in outcomes if o.confirmation is not None}
        if confirmations:
            benchmark.extra_info["confirmation"] = confirmations
        if self.state.compare.mode == "ab":
            # judged at the end of the session, paired with both rounds of the old revision
            benchmark.extra_info["qins_ab_decisive"] = {
                o.figure: o.decisive for o in outcomes if o.confirmation is not None
            }
            return outcomes
        failed = [o for o in outcomes if o.failed]
        if (
            failed
            and remeasure is not None
            and self.state.compare.mode == "stored"
            and self.request.config.getoption("perf_ab_confirm") == "on"
        ):
            failed = confirm_by_ab(self.state, self.request, benchmark, failed)
        if failed:
            pytest.fail("\n".join(o.message() for o in failed), pytrace=False)
        return outcomes


@pytest.fixture
def perf_gate(perf_state: PerfState, request: pytest.FixtureRequest) -> GateHandle:
    """The test's handle on the gate (:class:`GateHandle`)."""
    return GateHandle(perf_state, request)
