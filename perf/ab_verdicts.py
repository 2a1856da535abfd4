"""Same-job A/B verdicts: the baseline's revision measured here, paired with this revision.

Pure functions on the figures of both sides (``perf.ab`` runs the old side). A figure is judged by
the rule this revision stored for it, round by round with the old value as the baseline, and fails
when it is beyond its limit in more than half of the rounds. The same verdicts confirm or refute a
stored-baseline failure (:func:`apply_ab_confirmation`), an A/B-mode regression in fresh processes
(:func:`apply_fresh_confirmation`) and a trip of the absolute backstop (:func:`backstop_decide`).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from perf.gate import GATE_KEY, RULES_KEY, SAVE_COMMAND, Outcome, Rule, fmt, rule_from_json


@dataclass
class ABOutcome:
    """The A/B verdict on one figure of one benchmark: this revision (new) vs the baseline's (old), both
    measured here."""

    test: str
    figure: str
    rule: Rule | None
    new: list  # the figure per round, this revision
    old: list  # the figure per round, the old revision (paired with new[i])
    status: str = "pass"  # pass | regressed | new | ungated | refuted (regressed, then passed in fresh processes)
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "regressed"

    @property
    def ratios(self) -> list:
        return [n / o for n, o in zip(self.new, self.old) if o]

    @property
    def ratio(self) -> float | None:
        r = self.ratios
        return float(statistics.median(r)) if r else None

    def message(self, rev: str) -> str:
        if self.status == "new":
            return f"{self.test}: {self.figure} not gated: {self.note}"
        pairs = ", ".join(f"{fmt(n)}/{fmt(o)}" for n, o in zip(self.new, self.old))
        head = {"regressed": "REGRESSED", "pass": "ok", "ungated": "not gated", "refuted": "beyond, then REFUTED"}[
            self.status
        ]
        return (
            f"{self.test}: {self.figure} {head} in A/B against {rev[:12]} measured here: new/old per round {pairs} "
            f"(median ratio {fmt(self.ratio)}; rule {self.rule.describe() if self.rule else '-'}, "
            f"fails when beyond it in more than half of the rounds){' - ' + self.note if self.note else ''}"
        )


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def ab_decide(new_runs: Sequence[Mapping[str, Mapping]], old_runs: Sequence[Mapping[str, Mapping]]) -> list[ABOutcome]:
    """Pair round ``i`` of this revision with round ``i`` of the old one, per benchmark and gated figure.

    Runs map a benchmark's fullname to its ``extra_info``. The figures gated are those this
    revision gates (``qins_gate``) with the rule it stored (``qins_gate_rules``), so both sides
    are judged with the same rules as a stored baseline would be. Each round's pair is judged by
    the rule with the old value as the baseline; a figure fails when it is beyond its limit in
    more than half of the rounds (with two rounds: in both). A benchmark (or figure) the old
    revision did not produce is reported as new and not gated.
    """
    if len(new_runs) != len(old_runs) or not new_runs:
        raise ValueError(f"A/B needs as many rounds of each side: {len(new_runs)} vs {len(old_runs)}")
    out: list[ABOutcome] = []
    names = list(dict.fromkeys(n for run in new_runs for n in run))
    for name in names:
        infos = [run.get(name) or {} for run in new_runs]
        gated = next((i.get(GATE_KEY) for i in infos if i.get(GATE_KEY)), None) or []
        rules_json = next((i.get(RULES_KEY) for i in infos if i.get(RULES_KEY)), None) or {}
        for fig in gated:
            rule = rule_from_json(rules_json[fig]) if fig in rules_json else None
            new = [i.get(fig) for i in infos]
            old = [(run.get(name) or {}).get(fig) for run in old_runs]
            o = ABOutcome(test=name, figure=fig, rule=rule, new=[], old=[])
            out.append(o)
            if not any(name in run for run in old_runs):
                o.status, o.note = "new", "the old revision has no benchmark of this name"
                continue
            pairs = [(n, b) for n, b in zip(new, old) if _num(n) and _num(b)]
            if not pairs:
                o.status, o.note = "new", "the old revision does not measure this figure"
                continue
            o.new, o.old = [p[0] for p in pairs], [p[1] for p in pairs]
            if rule is None:
                o.status, o.note = "ungated", "no rule stored for this figure"
                continue
            if rule.min_baseline is not None and statistics.median(o.old) < rule.min_baseline:
                o.status, o.note = (
                    "ungated",
                    f"old value below {fmt(rule.min_baseline)}, too close to be told from noise",
                )
                continue
            beyond = sum(rule.exceeds(n, b) for n, b in pairs)
            o.status = "regressed" if beyond * 2 > len(pairs) else "pass"
            if beyond and o.status == "pass":
                o.note = f"beyond the limit in {beyond} of {len(pairs)} rounds"
    return out


def apply_fresh_confirmation(outcomes: Sequence[ABOutcome], test: str, verdicts: Sequence[ABOutcome], rev: str) -> None:
    """Judge A/B-mode regressions of benchmark ``test`` again by a confirmation A/B of it in fresh
    processes (``perf.ab.confirm``; ``verdicts`` from :func:`ab_decide` on its rounds).

    A regressed figure of ``test`` becomes "refuted" (not failed) when
    the confirmation passes it; it stays regressed when the confirmation regresses it too, or
    cannot judge it (no verdict, "new", "ungated": nothing refutes the run's own pairing). Either
    way its note gives the confirmation's rounds. Outcomes of other benchmarks are left as they are.
    """
    by_figure = {(v.test, v.figure): v for v in verdicts}
    for o in outcomes:
        if o.failed and o.test == test:
            rejudge(o, by_figure.get((o.test, o.figure)), rev, prefix="in fresh processes: ",
                    kept="confirmed in fresh processes: ", no_verdict="no verdict")


def ab_table(outcomes: Iterable[ABOutcome]) -> list[list[str]]:
    rows = [["benchmark", "figure", "new per round", "old per round", "median new/old", "limit", "verdict"]]
    for o in outcomes:
        lim = "-"
        if o.rule is not None and o.status in ("pass", "regressed", "refuted"):
            lim = o.rule.describe()
        rows.append(
            [
                o.test.split("::", 1)[-1],
                o.figure,
                " ".join(fmt(v) for v in o.new) or "-",
                " ".join(fmt(v) for v in o.old) or "-",
                fmt(o.ratio),
                lim,
                o.status.upper() if o.failed else o.status,
            ]
        )
    return rows


def apply_ab_confirmation(failed: Sequence[Outcome], verdicts: Sequence[ABOutcome], rev: str) -> list[Outcome]:
    """Judge stored-baseline failures again by a same-work A/B against the baseline's revision.

    A failed figure stays failed (the regression is confirmed) when its A/B verdict is
    "regressed", or when the A/B could not judge it (no verdict, "new", "ungated": nothing refutes
    the stored baseline). It becomes "refuted" (not failed) when the A/B passed it: this revision
    measured against the old one on this machine, in alternating rounds, is within the rule.
    Every failure gets the A/B's verdict as its note. Returns the figures that still fail.
    """
    by_figure = {(v.test, v.figure): v for v in verdicts}
    no_verdict = f"not confirmable by A/B against {rev[:12]}: no verdict"
    return [o for o in failed if rejudge(o, by_figure.get((o.test, o.figure)), rev, no_verdict=no_verdict)]


def predating(failed: Sequence[Outcome], rev: str, path: str) -> list[Outcome]:
    """Stored-baseline failures of a benchmark whose test file ``path`` the baseline's revision ``rev``
    does not have, so no A/B can measure it there. A figure the baseline lacks ("missing") is then
    "new", not gated, as an A/B reports a benchmark the old revision lacks (perf/README.md): the
    baseline predates the benchmark, so there is nothing it can have regressed from. Any other failure
    stays failed. Returns the figures that still fail."""
    still = []
    for o in failed:
        if o.status == "missing":
            o.status = "new"
            o.note = (f"this CPU's baseline predates it and its revision {rev[:12]} has no {path}; gated once the "
                      f"baseline is refreshed: {SAVE_COMMAND}")
        else:
            o.note = f"not confirmed by A/B: revision {rev[:12]} has no {path}"
            still.append(o)
    return still


def rejudge(o, verdict: ABOutcome | None, rev: str, *, prefix: str = "", kept: str = "", no_verdict: str) -> bool:
    """One failed figure ``o`` (an :class:`Outcome` or :class:`ABOutcome`) judged again by a
    confirmation's ``verdict`` for it: "refuted" (not failed; note ``prefix`` + the verdict) when the
    confirmation passed it, else left failed with note ``kept`` + the verdict (or ``no_verdict``).
    Returns whether it still fails."""
    if verdict is not None and verdict.status == "pass":
        o.status, o.note = "refuted", prefix + verdict.message(rev)
        return False
    o.note = kept + (verdict.message(rev) if verdict is not None else no_verdict)
    return True


def backstop_decide(new_mins: Sequence[float], old_mins: Sequence[float], factor: float) -> tuple[bool, str]:
    """A failure of the absolute backstop, re-measured as a same-work A/B here.

    ``new_mins[i]``/``old_mins[i]``: round ``i``'s minimum time (s) of one benchmark, this revision and
    the baseline's. The backstop's limit ``factor`` (``min:900%`` -> 10.0) is applied to each
    round's ratio ``new/old``: the regression is confirmed when a ratio exceeds it in more than half
    of the rounds (with two rounds: in both), as :func:`ab_decide` judges figures. Returns
    ``(confirmed, "new/old per round ...")``.
    """
    if len(new_mins) != len(old_mins) or not new_mins:
        raise ValueError(f"A/B needs as many rounds of each side: {len(new_mins)} vs {len(old_mins)}")
    ratios = [n / o if o > 0 else math.inf for n, o in zip(new_mins, old_mins)]
    beyond = sum(r > factor for r in ratios)
    rounds = ", ".join(f"{n:.4g}/{o:.4g} s ({r:.2f}x)" for n, o, r in zip(new_mins, old_mins, ratios))
    return beyond * 2 > len(ratios), f"new/old min per round {rounds}; limit {factor:g}x"
