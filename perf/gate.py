"""Pure logic of the QINS perf gate: rules, verdicts and the confirm-before-fail decision.

Nothing here imports torch or pytest, so the gate's tests (``tests/perf_gate/``) can feed
it synthetic results. The other pure parts live beside it: baseline files (:mod:`perf.baseline`),
CPU identity (:mod:`perf.cpu`), A/B verdicts (:mod:`perf.ab_verdicts`), the accuracy gate
(:mod:`perf.accuracy_gate`) and the absolute targets (:mod:`perf.targets`).

The gate never compares absolute times (the machine is far too noisy for that). Each gated figure
is a *ratio* measured within one test, QINS interleaved with its FP32 reference, or a byte count.
A figure fails only when it is beyond its limit twice: once in the benchmarked measurement and
once more in a confirmation measurement taken right after (``decide``).

Gated figures live in each benchmark's ``extra_info``; ``extra_info["qins_gate"]`` lists the
figure names that are gated, ``extra_info["qins_gate_rules"]`` their rules.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

#: The key in ``extra_info`` that lists the gated figures of one benchmark.
GATE_KEY = "qins_gate"
#: The command that creates (or refreshes) a baseline; quoted in every "no baseline" message.
SAVE_COMMAND = "pytest perf --benchmark-save=baseline"

#: Environment variable of the sensitivity self-check (see perf/README.md): a float >= 1.
INJECT_ENV = "QINS_PERF_INJECT_SLOWDOWN"

HIGHER = "higher"  # a larger value is worse (time ratios, bytes)
LOWER = "lower"  # a smaller value is worse (speedups, tokens/s)


def parse_factor(text: str | None) -> float:
    """The injected slowdown factor from an option/env value (None or "" = 1.0, no injection)."""
    if text is None or str(text).strip() == "":
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (1.0 <= value < 1000):
        raise ValueError(f"{INJECT_ENV} / --perf-inject-slowdown must be a number >= 1, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# Statistics on paired measurements
# --------------------------------------------------------------------------------------------


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Element-wise ``numerators[i] / denominators[i]`` of interleaved measurements."""
    if len(numerators) != len(denominators):
        raise ValueError(f"unpaired measurements: {len(numerators)} vs {len(denominators)}")
    if not numerators:
        raise ValueError("no measurements")
    out = []
    for a, b in zip(numerators, denominators):
        if not (b > 0 and math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"cannot take the ratio {a!r}/{b!r}")
        out.append(a / b)
    return out


def robust_ratio(ratios: Sequence[float]) -> float:
    """The median of paired ratios: a burst of load hitting either side of some pairs moves it little."""
    if not ratios:
        raise ValueError("no ratios")
    return float(statistics.median(ratios))


# --------------------------------------------------------------------------------------------
# Rules and verdicts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one figure is gated against its baseline value.

    * ``worse=HIGHER``: fails when ``value > baseline * (1 + tolerance)``.
    * ``worse=LOWER`` with ``gain=False``: fails when ``value < baseline * (1 - tolerance)``.
    * ``worse=LOWER`` with ``gain=True`` (a speedup such as no-cache/cache time): fails when less
      than ``1 - tolerance`` of the baseline's gain over 1 is left, i.e. when
      ``value < 1 + (baseline - 1) * (1 - tolerance)``. A speedup that collapses to about 1 fails
      whatever the tolerance below 1.
    """

    worse: str = HIGHER
    tolerance: float = 0.15
    gain: bool = False
    #: gate only when the baseline value is at least this (a speedup too close to 1 in the
    #: baseline cannot be told apart from noise); below it the figure is recorded, not gated
    min_baseline: float | None = None

    def __post_init__(self) -> None:
        if self.worse not in (HIGHER, LOWER):
            raise ValueError(f"worse must be {HIGHER!r} or {LOWER!r}, got {self.worse!r}")
        if not (0.0 <= self.tolerance and math.isfinite(self.tolerance)):
            raise ValueError(f"tolerance must be finite and >= 0, got {self.tolerance!r}")
        if self.gain and self.worse != LOWER:
            raise ValueError("gain rules are for speedups (worse='lower')")

    def limit(self, baseline: float) -> float:
        if self.worse == HIGHER:
            return baseline * (1.0 + self.tolerance)
        if self.gain and baseline > 1.0:
            return 1.0 + (baseline - 1.0) * (1.0 - self.tolerance)
        return baseline * (1.0 - self.tolerance)

    def exceeds(self, value: float, baseline: float) -> bool:
        if not math.isfinite(value):
            return True
        lim = self.limit(baseline)
        return value > lim if self.worse == HIGHER else value < lim

    def describe(self) -> str:
        if self.worse == HIGHER:
            return f"<= baseline +{self.tolerance:.0%}"
        if self.gain:
            return f">= {1 - self.tolerance:.0%} of the baseline's gain over 1"
        return f">= baseline -{self.tolerance:.0%}"


@dataclass
class Outcome:
    """The verdict on one figure of one benchmark."""

    test: str
    figure: str
    value: float
    rule: Rule
    baseline: float | None = None
    baseline_source: str | None = None
    confirmation: float | None = None
    status: str = "pass"  # pass | unconfirmed | regressed | refuted | missing | new | not-compared | ungated
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("regressed", "missing")

    @property
    def change(self) -> float | None:
        """Relative change of the figure against the baseline (0.1 = +10%)."""
        if self.baseline is None or not self.baseline:
            return None
        return self.decisive / self.baseline - 1.0

    @property
    def decisive(self) -> float:
        """The value the verdict rests on: the better of the two measurements when confirmed."""
        if self.confirmation is None:
            return self.value
        if self.rule.worse == HIGHER:
            return min(self.value, self.confirmation)
        return max(self.value, self.confirmation)

    @property
    def limit(self) -> float | None:
        return None if self.baseline is None else self.rule.limit(self.baseline)

    def message(self) -> str:
        if self.status == "missing":
            return (
                f"{self.test}: figure {self.figure!r} = {fmt(self.value)} has no baseline value in "
                f"{self.baseline_source} ({self.note}). Refresh the baseline with: {SAVE_COMMAND}"
            )
        if self.status == "new":
            return f"{self.test}: {self.figure} = {fmt(self.value)}: new, not gated ({self.note})"
        if self.status == "not-compared":
            return f"{self.test}: {self.figure} = {fmt(self.value)} (not compared: {self.note})"
        if self.status == "ungated":
            return (f"{self.test}: {self.figure} = {fmt(self.value)} vs baseline {fmt(self.baseline)} "
                    f"(not gated: {self.note})")
        assert self.baseline is not None
        head = {
            "regressed": "REGRESSED",
            "unconfirmed": "exceeded once, not confirmed by re-measuring",
            "refuted": "exceeded the stored baseline twice, REFUTED by A/B",
            "pass": "ok",
        }[self.status]
        measured = fmt(self.value)
        if self.confirmation is not None:
            measured += f", re-measured {fmt(self.confirmation)}"
        return (
            f"{self.test}: {self.figure} {head}: {measured} vs baseline {fmt(self.baseline)} "
            f"({pct(self.change)}; limit {fmt(self.limit)}, rule {self.rule.describe()}) "
            f"[baseline: {self.baseline_source}]{' - ' + self.note if self.note else ''}"
        )



def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.4g}"
    return f"{x:.4g}" if abs(x) < 100 else f"{x:.1f}"


def pct(change: float | None) -> str:
    return "-" if change is None else f"{change:+.1%}"


def decide(
    test: str,
    figures: Mapping[str, float],
    rules: Mapping[str, Rule],
    baseline_entry: Mapping | None,
    baseline_source: str | None,
    remeasure: Callable[[], Mapping[str, float]] | None = None,
) -> list[Outcome]:
    """Judge every gated figure of one benchmark; re-measure once before declaring a regression.

    ``baseline_entry`` is the baseline benchmark's ``extra_info`` (None: not comparing).
    ``remeasure`` returns fresh values of (at least) the figures that exceeded; it is called at most
    once, and only when some figure is beyond its limit. A figure fails only when both the first
    measurement and the confirmation are beyond the limit. Without ``remeasure`` a single excess
    fails (used for deterministic figures such as byte counts).
    """
    outcomes: list[Outcome] = []
    for name, rule in rules.items():
        if name not in figures:
            raise KeyError(f"{test}: gated figure {name!r} was not measured")
        value = float(figures[name])
        out = Outcome(test=test, figure=name, value=value, rule=rule, baseline_source=baseline_source)
        outcomes.append(out)
        if baseline_entry is None:
            out.status = "not-compared"
            out.note = "no --benchmark-compare"
            continue
        base = baseline_entry.get(name) if isinstance(baseline_entry, Mapping) else None
        if not isinstance(base, (int, float)) or isinstance(base, bool) or not math.isfinite(base) or base <= 0:
            out.status = "missing"
            out.note = (
                "the baseline has no benchmark of this name"
                if not baseline_entry
                else "the figure is absent or invalid"
            )
            continue
        out.baseline = float(base)
        if rule.min_baseline is not None and out.baseline < rule.min_baseline:
            out.status = "ungated"
            out.note = f"baseline {fmt(out.baseline)} < {fmt(rule.min_baseline)}, too close to be told from noise"
            continue
        out.status = "exceeded" if rule.exceeds(value, out.baseline) else "pass"

    exceeded = [o for o in outcomes if o.status == "exceeded"]
    if exceeded:
        again: Mapping[str, float] = remeasure() if remeasure is not None else {}
        for o in exceeded:
            if o.figure in again:
                o.confirmation = float(again[o.figure])
                o.status = "regressed" if o.rule.exceeds(o.confirmation, o.baseline) else "unconfirmed"
            elif remeasure is None:
                o.status = "regressed"
                o.note = "deterministic figure, no re-measure"
            else:
                raise KeyError(f"{test}: re-measure did not return figure {o.figure!r}")
    return outcomes


def outcome_table(outcomes: Iterable[Outcome]) -> list[list[str]]:
    """Rows (header first) for the terminal summary."""
    rows = [["benchmark", "figure", "now", "re-measured", "baseline", "change", "limit", "verdict"]]
    for o in outcomes:
        rows.append(
            [
                o.test.split("::", 1)[-1],
                o.figure,
                fmt(o.value),
                fmt(o.confirmation),
                fmt(o.baseline),
                pct(o.change),
                fmt(o.limit),
                o.status.upper() if o.failed else o.status,
            ]
        )
    return rows


def render_table(rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(rows[0], widths)) + " |"]
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows[1:]]
        return "\n".join(lines)
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(rows[0], widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows[1:]]
    return "\n".join(lines)


def rule_to_json(rule: Rule) -> dict:
    return {"worse": rule.worse, "tolerance": rule.tolerance, "gain": rule.gain, "min_baseline": rule.min_baseline}


def rule_from_json(d: Mapping) -> Rule:
    return Rule(
        d.get("worse", HIGHER), float(d.get("tolerance", 0.15)), bool(d.get("gain", False)), d.get("min_baseline")
    )


#: extra_info key where a benchmark stores its gated figures' rules (for A/B, which has no baseline file).
RULES_KEY = "qins_gate_rules"
