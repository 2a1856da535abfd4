"""The same-job A/B of the perf gate, run from the session's hooks and the gate's fixture.

* Mode "ab" (:func:`start`, :func:`finish`): the old revision's suite runs before this session
  (round 1, old side first) and again after it (round 2, this revision went first); each figure is
  then judged on both rounds (:func:`perf.ab_verdicts.ab_decide`), and a regression is confirmed in
  fresh processes of both revisions before it fails the run.
* Mode "stored": a figure beyond the stored baseline twice (:func:`confirm_by_ab`) and a trip of the
  absolute backstop (:func:`confirm_backstop`) are measured again as an A/B against the baseline's
  revision on this machine; that A/B decides.

``perf.ab`` (git export and subprocess runs) is imported only when an A/B runs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from perf.ab_verdicts import ab_decide, apply_ab_confirmation, apply_fresh_confirmation, backstop_decide, predating
from perf.baseline import Baseline
from perf.state import PerfState, state_of

#: A/B confirmations per session (each runs the old suite's test twice: ~10-60 s); a run with more
#: stored-baseline failures than this fails on the rest as stored-baseline failures.
MAX_AB_CONFIRMATIONS = 5


def ab_options(config: pytest.Config, state: PerfState) -> list[str]:
    """This run's measurement settings, for the old side of an A/B (both sides measure alike)."""
    out = [f"--perf-clock={state.settings.clock}", f"--perf-threads={state.settings.threads}"]
    if config.getoption("perf_budget") is not None:
        out.append(f"--perf-budget={config.getoption('perf_budget')}")
    return out


def new_side_options(config: pytest.Config, state: PerfState) -> list[str]:
    """The options of a run of this revision's suite in a subprocess (confirmations): this run's
    measurement options and its injected slowdown (which slows this revision only)."""
    return ab_options(config, state) + (
        [f"--perf-inject-slowdown={state.settings.factor}"] if state.settings.factor != 1.0 else []
    )


def ab_selection(config: pytest.Config) -> list[str]:
    """This run's selection (its path and node-id arguments), relative to the root, for the old side."""
    out = []
    root = config.rootpath
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        p = Path(path)
        p = p if p.is_absolute() else (config.invocation_params.dir / p)
        try:
            rel = p.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        out.append(str(rel) + sep + rest)
    return out


def say(config: pytest.Config, line: str, **markup) -> None:
    """Write ``line`` to the terminal (nothing when there is no terminal reporter)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line, **markup)


def start(session: pytest.Session) -> None:
    """A/B round 1, old side first: export the old revision and run its suite before this one."""
    config = session.config
    state = state_of(config)
    if state.compare.mode != "ab" or config.getoption("collectonly"):
        return
    from perf import ab

    say(
        config,
        f"qins-perf: A/B: measuring revision {state.ab.rev[:12]} on this machine (round 1 of 2, old side first) ...",
    )
    try:
        state.ab.old = ab.OldSide(
            config.rootpath,
            state.ab.rev,
            ab_selection(config),
            config.getoption("keyword") or None,
            config.getoption("markexpr") or None,
            ab_options(config, state),
        )
        if state.ab.old.dropped_options:
            say(
                config,
                f"qins-perf: A/B: revision {state.ab.rev[:12]} does not know {' '.join(state.ab.old.dropped_options)}; "
                "it measures with its own defaults there",
                red=True,
            )
        old1 = state.ab.old.run(1)
    except ab.RevisionError as exc:
        state.ab.error = str(exc)
        say(config, str(exc), red=True)
        return
    say(config, f"qins-perf: A/B: old revision measured in {state.ab.old.seconds[-1]:.0f} s ({len(old1)} benchmarks, "
                 f"{' '.join(state.ab.old.options) or 'its defaults'}); now this revision")
    # this session's figures are checked against round 1 as they are measured, so that an excess is
    # re-measured at once (the better of the two measurements is this revision's figure); the verdict
    # comes at the end, after round 2
    state.compare.baseline = Baseline(path=Path(f"A-B round 1: {state.ab.rev[:12]} measured here"), entries=old1,
                                      commit_info={"id": state.ab.rev})


def finish(session: pytest.Session, exitstatus: int) -> None:
    """A/B round 2, this revision first: run the old suite again, then pair and judge."""
    config = session.config
    state = state_of(config)
    if state.compare.mode != "ab" or state.ab.old is None or state.ab.error:
        if state.compare.mode == "ab" and state.ab.error:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if state.ab.old is not None:
            state.ab.old.cleanup()
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED or not state.results.records:
        state.ab.old.cleanup()
        return
    from perf import ab

    say(config, "")
    say(
        config,
        f"qins-perf: A/B: measuring revision {state.ab.rev[:12]} again (round 2 of 2, this revision went first) ...",
    )
    try:
        state.ab.old.run(2)
        state.ab.seconds = list(state.ab.old.seconds)
        new = {name: _ab_new_figures(rec["extra_info"]) for name, rec in state.results.records.items()}
        state.ab.outcomes = ab_decide([new, new], state.ab.old.runs)
        if config.getoption("perf_ab_confirm") == "on":
            _confirm_ab_mode(config, state)
    except ab.RevisionError as exc:
        state.ab.error = str(exc)
    finally:
        state.ab.old.cleanup()
    if state.ab.error or any(o.failed for o in state.ab.outcomes):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _confirm_ab_mode(config: pytest.Config, state: PerfState) -> None:
    """A/B-mode regressions judged again in fresh processes of both sides (``perf.ab.confirm``,
    CONFIRM_ROUNDS rounds), a benchmark at a time, at most MAX_AB_CONFIRMATIONS; stops at the first
    confirmed one (the run fails anyway). Unconfirmed ones keep their verdict, with the reason."""
    from perf import ab

    tests = list(dict.fromkeys(o.test for o in state.ab.outcomes if o.failed))
    options = new_side_options(config, state)
    why = ""
    for i, test in enumerate(tests):
        if not why and i >= MAX_AB_CONFIRMATIONS:
            why = f"{MAX_AB_CONFIRMATIONS} confirmations already spent in this run"
        if why:
            for o in state.ab.outcomes:
                if o.failed and o.test == test:
                    o.note = f"not confirmed in fresh processes: {why}"
            continue
        say(config, f"qins-perf: {test}: regressed in the A/B; confirming in fresh processes of both revisions "
                     f"({ab.CONFIRM_ROUNDS} rounds) ...")
        measured = ab.confirm(state.ab.old, config.rootpath, test, options)
        apply_fresh_confirmation(state.ab.outcomes, test, ab_decide(measured.new_runs, measured.old_runs), state.ab.rev)
        if any(o.failed and o.test == test for o in state.ab.outcomes):
            why = "a regression is already confirmed in this run (the run fails; no more A/B spent)"


def _ab_new_figures(info: dict) -> dict:
    """This revision's figures for A/B: the decisive (better) value where a figure was re-measured."""
    out = dict(info)
    out.update(info.get("qins_ab_decisive") or {})
    return out


def confirm_by_ab(state: PerfState, request: pytest.FixtureRequest, benchmark, failed: list) -> list:
    """A stored-baseline failure measured again against the baseline's revision, here, like for like
    (perf/README.md, "A/B confirmation"); returns the figures that still fail. Not run once a
    regression has been confirmed (the run fails anyway) or after MAX_AB_CONFIRMATIONS."""
    from perf import ab

    rev = str((state.compare.baseline.commit_info or {}).get("id") or "") if state.compare.baseline is not None else ""
    config = request.config
    if rev and not state.confirm.error and any(o.status == "missing" for o in failed):
        # A figure the baseline lacks, of a benchmark added after it (a new file, or a new test or
        # parametrization in a file the baseline's revision has): that revision cannot run the benchmark,
        # so nothing is measured there (and a later failure, of a benchmark it has, is still confirmed)
        path = request.node.nodeid.split("::")[0]
        try:
            full = ab.resolve_revision(config.rootpath, rev, state.compare.baseline.label)
            if not ab.has_path(config.rootpath, full, path):
                return predating(failed, rev, path)
            if state.confirm.old is None:
                state.confirm.old = ab.OldSide(config.rootpath, full, [path], None, None, ab_options(config, state))
            if ab.lacks_node(state.confirm.old.tree, request.node.nodeid):
                return predating(failed, rev, request.node.nodeid)
        except ab.RevisionError as exc:
            state.confirm.error = str(exc).splitlines()[0]
    why = state.confirm.error or ("" if rev else "the baseline records no git revision")
    if not why and state.confirm.regressed:
        why = "a regression is already confirmed by A/B in this run (the run fails; no more A/B spent)"
    elif not why and state.confirm.count >= MAX_AB_CONFIRMATIONS:
        why = f"{MAX_AB_CONFIRMATIONS} A/B confirmations already spent in this run"
    if why:
        for o in failed:
            o.note = f"not confirmed by A/B: {why}"
        return failed
    state.confirm.count += 1
    capture = config.pluginmanager.getplugin("capturemanager")  # shown while the test runs (it takes a while)
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        say(
            config,
            f"\nqins-perf: {benchmark.fullname}: beyond the stored baseline twice; A/B against {rev[:12]} measured "
            "here ...",
        )
    try:
        if state.confirm.old is None:
            state.confirm.old = ab.OldSide(
                config.rootpath,
                ab.resolve_revision(config.rootpath, rev, state.compare.baseline.label),
                [request.node.nodeid.split("::")[0]],
                None,
                None,
                ab_options(config, state),
            )
        options = new_side_options(config, state)
        measured = ab.confirm(state.confirm.old, config.rootpath, request.node.nodeid, options)
    except ab.RevisionError as exc:
        state.confirm.error = str(exc).splitlines()[0]
        for o in failed:
            o.note = f"not confirmed by A/B: {state.confirm.error}"
        return failed
    still = apply_ab_confirmation(failed, ab_decide(measured.new_runs, measured.old_runs), rev)
    state.confirm.regressed = state.confirm.regressed or bool(still)
    return still


def confirm_backstop(config: pytest.Config, state: PerfState) -> tuple[bool, list[str]]:
    """The absolute backstop's failures measured again as a same-work A/B against the baseline's
    revision, here (perf/README.md, "Absolute backstop"): each failing benchmark's minimum time,
    this revision against the old, two rounds alternating which goes first. Returns ``(fail the
    run?, report lines)``: the run fails when A/B confirms one failure, or when it cannot be run
    (no revision, another kind of backstop, too many failures, ``--perf-ab-confirm=off``)."""
    from perf import ab

    bs = getattr(config, "_benchmarksession", None)
    regressions = list(getattr(bs, "performance_regressions", None) or [])
    names = {name.rsplit(" (", 1)[0] for name, _ in regressions}
    nodes = sorted({b.fullname for b in getattr(bs, "benchmarks", []) if names & {b.name, b.name[5:], b.fullname}})
    checks = config.getoption("benchmark_compare_fail") or []
    rev = str((state.compare.baseline.commit_info or {}).get("id") or "") if state.compare.baseline is not None else ""
    why = ""
    if config.getoption("perf_ab_confirm") != "on":
        why = "--perf-ab-confirm=off"
    elif not rev:
        why = "the baseline records no git revision"
    elif state.confirm.error:
        why = state.confirm.error
    elif not all(type(c).__name__ == "PercentageRegressionCheck" and c.field == "min" for c in checks):
        why = "only a min:N% backstop is confirmed by A/B"
    elif not nodes:
        why = "the failing benchmarks are not among this run's"
    elif len(nodes) > MAX_AB_CONFIRMATIONS:
        why = f"{len(nodes)} benchmarks failed it, more than the {MAX_AB_CONFIRMATIONS} confirmed by A/B"
    if why:
        return True, [f"not confirmed by A/B: {why}"]
    factor = 1.0 + min(float(c.threshold) for c in checks) / 100.0
    measure = ab_options(config, state)
    options = new_side_options(config, state)
    say(
        config,
        f"\nqins-perf: absolute backstop tripped by {len(nodes)} benchmark(s); A/B against {rev[:12]} measured here "
        "...",
    )
    lines, confirmed = [], False
    try:
        if state.confirm.old is None:
            state.confirm.old = ab.OldSide(
                config.rootpath,
                ab.resolve_revision(config.rootpath, rev, state.compare.baseline.label),
                [nodes[0].split("::")[0]],
                None,
                None,
                measure,
            )
        for node in nodes:
            new_mins, old_mins = ab.confirm_backstop(state.confirm.old, config.rootpath, node, options)
            bad, how = backstop_decide(new_mins, old_mins, factor)
            confirmed = confirmed or bad
            lines.append(f"{node}: {'CONFIRMED' if bad else 'refuted'} by A/B against {rev[:12]} measured here: {how}")
    except ab.RevisionError as exc:
        return True, lines + [f"not confirmed by A/B: {str(exc).splitlines()[0]}"]
    return confirmed, lines
