"""The perf gate's terminal summary: verdict tables, targets, the figures table and chart files.

Reads only the session's :class:`~perf.state.PerfState`; the verdicts themselves are decided
elsewhere (this module never changes the exit status except for a backstop trip confirmed by A/B).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from perf.ab_session import confirm_backstop
from perf.ab_verdicts import ab_table
from perf.gate import INJECT_ENV, outcome_table, render_table
from perf.state import PerfState
from perf.targets import report_targets


def _list(tr, outcomes: list, what: str, *, prefix: str = "", bold: bool = False, **colour: bool) -> None:
    """``prefix`` + "<count> ``what``" (``bold`` if asked) and one line per outcome's message, in ``colour``
    (nothing when empty)."""
    if not outcomes:
        return
    tr.write_line(f"{prefix}{len(outcomes)} {what}", bold=bold, **colour)
    for o in outcomes:
        tr.write_line("  " + o.message(), **colour)


def backstop_tripped(terminalreporter, config: pytest.Config, state: PerfState) -> None:
    """pytest-benchmark's absolute backstop (--benchmark-compare-fail) fired; it has already
    printed which benchmark and field. Confirm it by A/B, and report it as a failed run (without a
    traceback) only when that A/B confirms it."""
    fail = config.getoption("benchmark_compare_fail") or []
    exprs = ", ".join(f"{c.field}:{c.threshold}{'%' if 'Percentage' in type(c).__name__ else 's'}" for c in fail)
    where = state.compare.baseline.label if state.compare.baseline is not None else "the compared run"
    confirmed, state.confirm.backstop_ab = confirm_backstop(config, state)
    if confirmed:
        state.confirm.backstop_failed = (
            f"absolute backstop --benchmark-compare-fail={exprs} failed against {where} "
            f"(which benchmark and by how much: 'Performance has regressed' above)"
        )
        session = getattr(terminalreporter, "_session", None)
        if session is not None:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        state.confirm.backstop_refuted = (
            f"absolute backstop --benchmark-compare-fail={exprs} tripped against {where}, but the same-work "
            f"A/B refuted it (the machine was slower, not the code):"
        )


def report(tr, state: PerfState) -> None:
    """The "QINS perf gate" section of the terminal summary (nothing when nothing was measured),
    and the ``--perf-table`` / ``--perf-plot`` files."""
    if (
        not state.results.records
        and not state.results.outcomes
        and not state.ab.error
        and not state.results.target_results
        and not state.results.accuracy_target_results
    ):
        return
    tr.section("QINS perf gate", sep="-", bold=True)
    if state.settings.factor != 1.0:
        tr.write_line(
            f"INJECTED SLOWDOWN: every QINS forward x{state.settings.factor} ({INJECT_ENV} / --perf-inject-slowdown)",
            yellow=True,
        )
    tr.write_line(f"CPU: {state.machine.label}")
    tr.write_line(f"mode: {state.compare.mode_line}")
    if state.compare.mode == "ab":
        _report_ab(tr, state)
    compared = (
        [o for o in state.results.outcomes if o.status != "not-compared"] if state.compare.mode == "stored" else []
    )
    if compared:
        tr.write_line(render_table(outcome_table(compared)))
        bad = [o for o in compared if o.failed]
        unconfirmed = [o for o in compared if o.status == "unconfirmed"]
        if unconfirmed:
            tr.write_line(f"{len(unconfirmed)} figure(s) exceeded once but passed the confirmation re-measure.")
        _list(tr, [o for o in compared if o.status == "refuted"], "figure(s) beyond the stored baseline twice "
              "passed the A/B confirmation (this revision against the baseline's, measured here):", yellow=True)
        new = [o for o in compared if o.status == "new"]
        _list(tr, new, "figure(s) new, not gated (benchmarks this CPU's baseline and its revision predate):",
              yellow=True)
        if bad:
            _list(tr, bad, "figure(s) regressed:", prefix="GATE FAILED: ", bold=True, red=True)
        else:
            tr.write_line(f"gate passed: {len(compared) - len(new)} figure(s) within limits.", green=True)
    _report_accuracy(tr, state)
    report_targets(tr, state)
    if state.confirm.backstop_failed:
        tr.write_line("GATE FAILED: " + state.confirm.backstop_failed, red=True, bold=True)
    elif state.confirm.backstop_refuted:
        tr.write_line(state.confirm.backstop_refuted, yellow=True)
    for line in state.confirm.backstop_ab:
        tr.write_line("  " + line, red=bool(state.confirm.backstop_failed), yellow=not state.confirm.backstop_failed)
    rows = figures_rows(state)
    if rows:
        tr.write_line("")
        tr.write_line("figures of this run:")
        tr.write_line(render_table(rows))
    cfg = state.config
    table_path = cfg.getoption("perf_table")
    if table_path and rows:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(render_table(rows, markdown=True) + "\n", encoding="utf8")
        tr.write_line(f"wrote figures table: {table_path}")
    plot_path = cfg.getoption("perf_plot")
    if plot_path and state.results.records:
        try:
            from perf.plot import make_chart

            current = {k: v["extra_info"] for k, v in state.results.records.items()}
            base = state.compare.baseline.entries if state.compare.baseline is not None else None
            make_chart(
                current,
                base,
                plot_path,
                baseline_label=state.compare.baseline.label if state.compare.baseline else None,
            )
            tr.write_line(f"wrote chart: {plot_path}")
        except Exception as exc:  # a chart must never turn a passing gate into a crash
            tr.write_line(f"could not write chart {plot_path}: {type(exc).__name__}: {exc}", red=True)


def _report_ab(tr, state: PerfState) -> None:
    if state.ab.error:
        tr.write_line("GATE FAILED: A/B could not be completed: " + state.ab.error, red=True, bold=True)
        return
    if not state.ab.outcomes:
        return
    secs = " + ".join(f"{s:.0f} s" for s in state.ab.seconds)
    tr.write_line(f"A/B rounds: old, new | new, old (old revision's suite took {secs}); speed figures of the stored "
                  f"baseline {state.ab.base.label if state.ab.base else ''} are not used")
    tr.write_line(render_table(ab_table(state.ab.outcomes)))
    new = [o for o in state.ab.outcomes if o.status == "new"]
    if new:
        tr.write_line(
            f"{len(new)} figure(s) new in this revision (the old one does not measure them): reported, not gated."
        )
    bad = [o for o in state.ab.outcomes if o.failed]
    judged = [o for o in state.ab.outcomes if o.status in ("pass", "regressed", "refuted")]
    refuted = [o for o in state.ab.outcomes if o.status == "refuted"]
    if refuted:
        tr.write_line(f"{len(refuted)} figure(s) regressed in the A/B's rounds and were refuted by its confirmation "
                      "in fresh processes of both revisions:", yellow=True)
        for o in refuted:
            tr.write_line("  " + o.message(state.ab.rev), yellow=True)
    if bad:
        tr.write_line(
            f"GATE FAILED (A/B against {state.ab.rev[:12]} measured here): {len(bad)} figure(s) regressed:",
            red=True,
            bold=True,
        )
        for o in bad:
            tr.write_line("  " + o.message(state.ab.rev), red=True)
    else:
        tr.write_line(
            f"gate passed (A/B against {state.ab.rev[:12]} measured here): {len(judged)} figure(s) within limits.",
            green=True,
        )


def _report_accuracy(tr, state: PerfState) -> None:
    outs = state.results.accuracy_outcomes
    if not outs:
        return
    src = state.compare.accuracy_baseline.label if state.compare.accuracy_baseline else "none"
    tr.write_line(f"accuracy gate (against {src}; accuracy is CPU-independent, so any baseline serves):")
    for o in outs:
        tr.write_line("  " + o.message(), red=o.failed)
    bad = [o for o in outs if o.failed]
    if bad:
        tr.write_line(f"ACCURACY GATE FAILED: {len(bad)} figure(s).", red=True, bold=True)


#: (extra_info key, column title, format) of the figures table.
FIGURE_COLUMNS = [
    ("time_s", "median s", "{:.4g}"),
    ("ratio_vs_linear", "x nn.Linear", "{:.3g}"),
    ("ratio_same_kind", "x same-kind ref", "{:.3g}"),
    ("gbps", "GB/s", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:.4g}"),
    ("ratio_vs_fp32", "x FP32 time", "{:.3g}"),
    ("cache_speedup", "no-cache/cache", "{:.3g}"),
    ("model_mib", "model MiB", "{:.4g}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.4g}"),
    ("peak_generate_delta_mib", "gen. peak +MiB", "{:.4g}"),
]


def figures_rows(state: PerfState) -> list[list[str]]:
    rows = [["group", "benchmark"] + [c[1] for c in FIGURE_COLUMNS]]
    for rec in state.results.records.values():
        info = rec["extra_info"]
        row = [str(rec["group"] or ""), rec["name"]]
        for key, _title, f in FIGURE_COLUMNS:
            v = info.get(key, rec["median"] if key == "time_s" else None)
            row.append(f.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "")
        rows.append(row)
    return rows if len(rows) > 1 else []
