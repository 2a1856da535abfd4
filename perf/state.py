"""The perf session's state, one object per concern, kept in ``config.stash`` for the whole run.

:class:`PerfState` holds:

* ``settings``: how this run measures (threads, clock, budget, tolerances, injected slowdown);
* ``machine``: this machine's CPU identity (which baselines may gate speed here);
* ``compare``: what the run is compared against (the mode, the stored baseline, the accuracy
  baseline);
* ``results``: what the tests measured and the verdicts on it;
* ``ab``: the same-job A/B of mode "ab" (the old revision measured here);
* ``confirm``: the A/B confirmations of stored-baseline failures and of the absolute backstop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from perf.baseline import Baseline


@dataclass
class Settings:
    """How this run measures, from the command line (:mod:`perf.options`)."""

    threads: int = 1  #: torch.set_num_threads for the suite
    factor: float = 1.0  #: injected slowdown of every QINS forward (1.0: none), >= 1
    tol: dict[str, float] = field(default_factory=dict)  #: rule family -> relative tolerance (0.15 = 15%)
    budget: float = 1.0  #: scale of the time (pairs) spent per benchmark
    clock: str = "wall"  #: what the timers read: "cpu" (thread CPU time) or "wall"
    targets: str = "report"  #: --perf-targets: "report" or "on" (absolute targets asserted)


@dataclass
class Machine:
    """This machine's CPU (:mod:`perf.cpu`): py-cpuinfo's record, its storage key and its label."""

    cpu: dict = field(default_factory=dict)
    key: str = ""  #: directory name of this CPU's baselines under the storage root
    label: str = ""  #: human-readable identity, quoted in messages


@dataclass
class Comparison:
    """What this run is compared against (perf/README.md, "Modes")."""

    mode: str = "none"  #: none | stored | ab
    mode_line: str = "no --benchmark-compare: figures are measured, not gated"
    #: the speed baseline: this CPU's stored run, or round 1 of the old revision in A/B mode
    baseline: Baseline | None = None
    #: any CPU's baseline: accuracy does not depend on the CPU
    accuracy_baseline: Baseline | None = None


@dataclass
class Results:
    """What the tests measured and the verdicts on it, in test order."""

    #: benchmark fullname -> {"group", "name", "extra_info", "median" (s, or None)}
    records: dict[str, dict] = field(default_factory=dict)
    #: a benchmark's ``key`` (``perf_gate.record(..., key=)``) -> its extra_info, for later tests
    by_key: dict[str, dict] = field(default_factory=dict)
    outcomes: list = field(default_factory=list)  #: perf.gate.Outcome per gated figure
    accuracy_outcomes: list = field(default_factory=list)  #: perf.accuracy_gate.AccuracyOutcome
    #: every absolute speed target judged: (test, kernel path, "met" or "missed", what was measured)
    target_results: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: every absolute accuracy target judged (CPU-independent): (test, "met" or "missed", what)
    accuracy_target_results: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class ABRun:
    """Mode "ab": the newest baseline's revision measured on this machine, before and after this run."""

    base: Baseline | None = None  #: the baseline whose revision is measured
    rev: str = ""  #: that revision (a full commit id)
    old: Any = None  #: perf.ab.OldSide, the old revision's exported suite
    outcomes: list = field(default_factory=list)  #: perf.ab_verdicts.ABOutcome per gated figure
    error: str = ""  #: why the A/B could not be completed ("" when it could)
    seconds: list[float] = field(default_factory=list)  #: the old suite's duration per round (s)


@dataclass
class Confirmations:
    """A/B confirmations against the baseline's revision of stored-baseline failures and of the
    absolute backstop (at most ``perf.ab_session.MAX_AB_CONFIRMATIONS`` per run)."""

    old: Any = None  #: perf.ab.OldSide, exported on the first confirmation and reused
    error: str = ""  #: why confirming is impossible in this run ("" when it is possible)
    count: int = 0  #: confirmations run so far
    regressed: bool = False  #: one of them confirmed a regression
    backstop_failed: str = ""  #: the backstop's failure, confirmed (the run fails)
    backstop_refuted: str = ""  #: the backstop's trip, refuted by A/B
    backstop_ab: list[str] = field(default_factory=list)  #: the backstop's A/B, a line per benchmark


class PerfState:
    """Per-session state of the perf gate: one object per concern (see the module docstring)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings = Settings()
        self.machine = Machine()
        self.compare = Comparison()
        self.results = Results()
        self.ab = ABRun()
        self.confirm = Confirmations()


STATE_KEY = pytest.StashKey[PerfState]()


def state_of(config: pytest.Config) -> PerfState:
    """The session's state, created by ``pytest_configure`` (:func:`perf.session.configure`)."""
    return config.stash[STATE_KEY]
