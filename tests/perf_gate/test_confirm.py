"""A/B confirmation of a stored-baseline failure and of the absolute backstop (subprocesses in a
real git checkout)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from perf import gate as G
from perf.ab_verdicts import (
    ABOutcome,
    apply_ab_confirmation,
)
from perf.baseline import (
    Baseline,
)
from perf.gate import HIGHER, Rule
from tests.perf_gate.support import (
    SYNTH_AB_TEST,
    _git,
    saved_files,
)

# --------------------------------------------------------------------------------------------
# A/B confirmation of a stored-baseline failure
# --------------------------------------------------------------------------------------------


def _stale_stored_baseline(run, value: float) -> None:
    """Save a baseline on this CPU at HEAD, then overwrite its figure (as a bimodal machine state
    once put a figure far from what the same code measures later)."""
    rc, out = run("--benchmark-save=baseline")
    assert rc == 0, out
    (path,) = saved_files(run.repo)
    data = json.loads(path.read_text())
    data["benchmarks"][0]["extra_info"]["ratio_vs_linear"] = value
    path.write_text(json.dumps(data))


def test_stored_failure_refuted_by_ab_passes_and_says_so(synth_git):
    _stale_stored_baseline(synth_git, 1.0)  # this code measures 2.0: +100% against the stored figure
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "mode: stored baseline for" in out
    assert "beyond the stored baseline twice; A/B against" in out
    assert "REFUTED by A/B" in out and "ok in A/B against" in out and "new/old per round 2/2, 2/2, 2/2" in out
    assert "passed the A/B confirmation" in out and "Traceback" not in out


def test_stored_failure_confirmed_by_ab_fails(synth_git):
    _stale_stored_baseline(synth_git, 1.0)
    (synth_git.repo / "ratio.txt").write_text("3.0")  # this revision (uncommitted) is 1.5x the baseline's
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "ratio_vs_linear REGRESSED: 3, re-measured 3 vs baseline 1 " in out and "REGRESSED in A/B against" in out
    assert "new/old per round 3/2, 3/2, 3/2" in out and "REFUTED" not in out


def test_stored_failure_without_ab_confirmation_fails_at_once(synth_git):
    _stale_stored_baseline(synth_git, 1.0)
    rc, out = synth_git("--benchmark-compare", "--perf-ab-confirm=off")
    assert rc == 1, out
    assert "ratio_vs_linear REGRESSED" in out and "A/B against" not in out


def test_stored_failure_whose_revision_is_unreachable_fails_saying_why(synth_git):
    _stale_stored_baseline(synth_git, 1.0)
    (path,) = saved_files(synth_git.repo)
    data = json.loads(path.read_text())
    data["commit_info"]["id"] = "e" * 40
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "not confirmed by A/B" in out and "cannot be checked out here" in out and "Traceback" not in out


def test_apply_ab_confirmation_keeps_failures_the_ab_cannot_judge():
    def failed(fig):
        return G.Outcome(test="t::a", figure=fig, value=2.0, rule=Rule(HIGHER, 0.15), baseline=1.0, status="regressed")

    ok, bad, new, absent = failed("x"), failed("y"), failed("z"), failed("w")
    verdicts = [
        ABOutcome(test="t::a", figure="x", rule=Rule(HIGHER, 0.15), new=[2.0, 2.0], old=[2.0, 2.0], status="pass"),
        ABOutcome(test="t::a", figure="y", rule=Rule(HIGHER, 0.15), new=[2.0, 2.0], old=[1.0, 1.0], status="regressed"),
        ABOutcome(test="t::a", figure="z", rule=Rule(HIGHER, 0.15), new=[], old=[], status="new", note="no benchmark"),
    ]
    still = apply_ab_confirmation([ok, bad, new, absent], verdicts, "a" * 40)
    assert still == [bad, new, absent]
    assert ok.status == "refuted" and not ok.failed and "ok in A/B against aaaaaaaaaaaa" in ok.note
    assert bad.failed and "REGRESSED in A/B" in bad.note and new.failed and "not gated" in new.note
    assert absent.failed and absent.note == "not confirmable by A/B against aaaaaaaaaaaa: no verdict"


#: a parametrized benchmark for test_synth.py: ``{cases}`` is the list of its ids
PARAMETRIZED_TEST = textwrap.dedent(
    """
    import pytest as _pytest

    @_pytest.mark.parametrize("case", {cases})
    def test_case(benchmark, perf_gate, case):
        benchmark.pedantic(lambda: None, rounds=3)
        perf_gate.check(benchmark, {{"ratio_vs_linear": 2.0}}, {{"ratio_vs_linear": Rule(HIGHER, 0.15)}},
                        lambda: {{"ratio_vs_linear": 2.0}})
    """
)


def test_a_case_added_to_a_benchmark_after_the_baseline_is_new_not_gated_and_passes(synth_git):
    """A new parametrization in a file the baseline's revision has: that revision cannot run it (its
    pytest does not find the id), so the figure is new, as for a new file."""
    repo = synth_git.repo
    for cases in ('["b1"]', '["b1", "b8"]'):
        (repo / "test_synth.py").write_text(SYNTH_AB_TEST + PARAMETRIZED_TEST.format(cases=cases))
        _git(repo, "add", "-A")
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"cases {cases}")
        if cases == '["b1"]':
            rc, out = synth_git("--benchmark-save=baseline")
            assert rc == 0, out
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "test_synth.py::test_case[b8]: ratio_vs_linear = 2: new, not gated (this CPU's baseline predates it" in out
    assert "has no test_synth.py::test_case[b8]" in out and "A/B against" not in out
    assert "1 figure(s) new, not gated" in out and "gate passed: 2 figure(s) within limits." in out


def _benchmark_added_after_the_baseline(synth_git) -> None:
    """Save a baseline at HEAD, then commit a second benchmark (``test_a_new.py``, which runs first)."""
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    (synth_git.repo / "test_a_new.py").write_text(SYNTH_AB_TEST)
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a new benchmark")


def test_a_benchmark_added_after_the_baseline_is_new_not_gated_and_passes(synth_git):
    _benchmark_added_after_the_baseline(synth_git)
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "test_a_new.py::test_layer: ratio_vs_linear = 2: new, not gated (this CPU's baseline predates it" in out
    assert "has no test_a_new.py" in out and "A/B against" not in out  # nothing to measure at that revision
    assert "1 figure(s) new, not gated" in out and "gate passed: 1 figure(s) within limits." in out


def test_a_new_benchmark_does_not_stop_a_later_regression_being_confirmed_by_ab(synth_git):
    _benchmark_added_after_the_baseline(synth_git)
    (synth_git.repo / "ratio.txt").write_text("3.0")  # both benchmarks read it: the old one regresses 1.5x
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "test_a_new.py::test_layer: ratio_vs_linear = 3: new, not gated" in out
    assert out.count("beyond the stored baseline twice; A/B against") == 1
    assert "test_synth.py::test_layer: ratio_vs_linear REGRESSED" in out and "REGRESSED in A/B against" in out


def test_predating_makes_only_figures_the_baseline_lacks_new():
    from perf.ab_verdicts import predating

    missing = G.Outcome(test="p.py::a", figure="x", value=2.0, rule=Rule(HIGHER, 0.15), status="missing")
    regressed = G.Outcome(test="p.py::a", figure="y", value=2.0, rule=Rule(HIGHER, 0.15), baseline=1.0,
                          status="regressed")
    still = predating([missing, regressed], "b" * 40, "p.py")
    assert still == [regressed] and regressed.failed
    assert regressed.note == "not confirmed by A/B: revision bbbbbbbbbbbb has no p.py"
    assert missing.status == "new" and not missing.failed and G.SAVE_COMMAND in missing.note
    assert missing.message().startswith("p.py::a: x = 2: new, not gated (this CPU's baseline predates it")


def test_after_one_confirmed_regression_later_failures_spend_no_more_ab(synth_git):
    (synth_git.repo / "test_synth2.py").write_text(SYNTH_AB_TEST)  # a second benchmark, same figure file
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two benchmarks")
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    (path,) = saved_files(synth_git.repo)
    data = json.loads(path.read_text())
    for bench in data["benchmarks"]:
        bench["extra_info"]["ratio_vs_linear"] = 1.0
    path.write_text(json.dumps(data))
    (synth_git.repo / "ratio.txt").write_text("3.0")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert out.count("beyond the stored baseline twice; A/B against") == 1
    assert "REGRESSED in A/B against" in out
    assert "not confirmed by A/B: a regression is already confirmed by A/B in this run" in out


def test_ab_confirmations_stop_at_the_session_budget():
    from types import SimpleNamespace

    from perf.ab_session import MAX_AB_CONFIRMATIONS, confirm_by_ab
    from perf.state import PerfState

    state = PerfState(None)
    state.compare.baseline = Baseline(path=Path("b.json"), entries={}, commit_info={"id": "c" * 40})
    state.confirm.count = MAX_AB_CONFIRMATIONS
    failed = [G.Outcome(test="t::a", figure="x", value=2.0, rule=Rule(HIGHER, 0.15), baseline=1.0, status="regressed")]
    still = confirm_by_ab(state, SimpleNamespace(config=None), None, failed)
    assert still == failed and still[0].failed
    assert still[0].note == f"not confirmed by A/B: {MAX_AB_CONFIRMATIONS} A/B confirmations already spent in this run"
    assert state.confirm.count == MAX_AB_CONFIRMATIONS


SLOW_TEST = textwrap.dedent(
    """
    import time
    from pathlib import Path

    def test_slow(benchmark):
        pause = float(Path("sleep.txt").read_text())  # from this tree: the old revision's export has its own
        benchmark.pedantic(lambda: time.sleep(pause), rounds=3)
    """
)


def _baseline_that_trips_the_backstop(run) -> tuple[Path, dict]:
    """Commit a sleeping benchmark (``SLOW_TEST``, 1 ms), save a wall-clock baseline, and return
    its file and its data with that benchmark's stored time 100x faster than it runs (unwritten)."""
    repo = run.repo
    (repo / "test_slow.py").write_text(SLOW_TEST)
    (repo / "sleep.txt").write_text("0.001")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "slow test")
    rc, out = run("--benchmark-save=baseline", "--perf-clock=wall")
    assert rc == 0, out
    (path,) = saved_files(repo)
    data = json.loads(path.read_text())
    (slow,) = [b for b in data["benchmarks"] if b["name"] == "test_slow"]
    slow["stats"]["min"] /= 100  # the stored time looks 100x faster than this machine now runs it
    return path, data


@pytest.mark.slow
def test_plugin_backstop_failure_is_confirmed_or_refuted_by_a_same_work_ab(synth_git):
    """The absolute backstop (min:900%, wall clock: sleeping takes no CPU time) trips in both runs;
    the A/B of the benchmark's time against the baseline's revision decides: unchanged code passes,
    a 30x slower tree fails."""
    repo = synth_git.repo
    path, data = _baseline_that_trips_the_backstop(synth_git)
    path.write_text(json.dumps(data))
    rev = data["commit_info"]["id"][:12]

    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%")
    assert rc == 0, out
    assert "Performance has regressed" in out  # pytest-benchmark still says which benchmark and by how much
    assert "tripped against" in out and "A/B refuted it" in out
    assert f"test_slow.py::test_slow: refuted by A/B against {rev} measured here" in out and "Traceback" not in out

    (repo / "sleep.txt").write_text("0.03")  # this tree only: the baseline's revision still sleeps 1 ms
    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%")
    assert rc == 1, out
    assert "GATE FAILED: absolute backstop" in out
    assert f"test_slow.py::test_slow: CONFIRMED by A/B against {rev} measured here" in out and "Traceback" not in out

    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%", "--perf-ab-confirm=off")
    assert rc == 1, out
    assert "GATE FAILED: absolute backstop" in out and "not confirmed by A/B: --perf-ab-confirm=off" in out


@pytest.mark.slow
def test_backstop_confirmation_after_a_figure_confirmation_in_one_run_reuses_the_export(synth_git):
    """A figure beyond its stored baseline (A/B-refuted during its test) and a tripped backstop
    (A/B-refuted at the end) in one run: both confirmations use one export of the baseline's
    revision, which must outlive the first (a campaign run once crashed here with FileNotFoundError,
    the export removed at session finish before the backstop's confirmation ran)."""
    path, data = _baseline_that_trips_the_backstop(synth_git)
    (layer,) = [b for b in data["benchmarks"] if b["name"] == "test_layer"]
    layer["extra_info"]["ratio_vs_linear"] = 1.0  # this code measures 2.0: +100%, refuted by A/B
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%")
    assert rc == 0, out
    assert "REFUTED by A/B" in out and "A/B refuted it" in out
    assert "test_slow.py::test_slow: refuted by A/B against" in out
    assert "Traceback" not in out and "FileNotFoundError" not in out
