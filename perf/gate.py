"""Pure logic of the QINS perf gate: rules, verdicts, confirmation, and baseline files.

Nothing here imports torch or pytest, so `tests/test_perf_gate.py` can feed it synthetic results.

The gate never compares absolute times (the machine is far too noisy for that). Each gated figure
is a *ratio* measured within one test, QINS interleaved with its FP32 reference, or a byte count.
A figure fails only when it is beyond its limit twice: once in the benchmarked measurement and
once more in a confirmation measurement taken right after (``decide``).

Baselines are the JSON files pytest-benchmark writes with ``--benchmark-save`` under its storage
(``.benchmarks/<machine id>/NNNN_<name>.json``). Gated figures live in each benchmark's
``extra_info``; ``extra_info["qins_gate"]`` lists the figure names that are gated.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

#: The key in ``extra_info`` that lists the gated figures of one benchmark.
GATE_KEY = "qins_gate"
#: The command that creates (or refreshes) a baseline; quoted in every "no baseline" message.
SAVE_COMMAND = "pytest perf --benchmark-save=baseline"
#: pytest-benchmark's default glob for saved runs ("NNNN_name.json").
SAVED_RUN_GLOB = "[0-9][0-9][0-9][0-9]_*.json"

#: Environment variable of the sensitivity self-check (see perf/README.md): a float >= 1.
INJECT_ENV = "QINS_PERF_INJECT_SLOWDOWN"

HIGHER = "higher"  # a larger value is worse (time ratios, bytes)
LOWER = "lower"  # a smaller value is worse (speedups, tokens/s)


class BaselineError(Exception):
    """No usable baseline: the message says what is wrong and how to create one."""


def parse_factor(text: Optional[str]) -> float:
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
    min_baseline: Optional[float] = None

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
    baseline: Optional[float] = None
    baseline_source: Optional[str] = None
    confirmation: Optional[float] = None
    status: str = "pass"  # pass | unconfirmed | regressed | refuted | missing | not-compared | ungated
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("regressed", "missing")

    @property
    def change(self) -> Optional[float]:
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
    def limit(self) -> Optional[float]:
        return None if self.baseline is None else self.rule.limit(self.baseline)

    def message(self) -> str:
        if self.status == "missing":
            return (
                f"{self.test}: figure {self.figure!r} = {fmt(self.value)} has no baseline value in "
                f"{self.baseline_source} ({self.note}). Refresh the baseline with: {SAVE_COMMAND}"
            )
        if self.status == "not-compared":
            return f"{self.test}: {self.figure} = {fmt(self.value)} (not compared: {self.note})"
        if self.status == "ungated":
            return f"{self.test}: {self.figure} = {fmt(self.value)} vs baseline {fmt(self.baseline)} (not gated: {self.note})"
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


def apply_ab_confirmation(failed: Sequence[Outcome], verdicts: Sequence["ABOutcome"], rev: str) -> list[Outcome]:
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


def rejudge(o, verdict: Optional["ABOutcome"], rev: str, *, prefix: str = "", kept: str = "", no_verdict: str) -> bool:
    """One failed figure ``o`` (an :class:`Outcome` or :class:`ABOutcome`) judged again by a
    confirmation's ``verdict`` for it: "refuted" (not failed; note ``prefix`` + the verdict) when the
    confirmation passed it, else left failed with note ``kept`` + the verdict (or ``no_verdict``).
    Returns whether it still fails."""
    if verdict is not None and verdict.status == "pass":
        o.status, o.note = "refuted", prefix + verdict.message(rev)
        return False
    o.note = kept + (verdict.message(rev) if verdict is not None else no_verdict)
    return True


def fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.4g}"
    return f"{x:.4g}" if abs(x) < 100 else f"{x:.1f}"


def pct(change: Optional[float]) -> str:
    return "-" if change is None else f"{change:+.1%}"


def decide(
    test: str,
    figures: Mapping[str, float],
    rules: Mapping[str, Rule],
    baseline_entry: Optional[Mapping],
    baseline_source: Optional[str],
    remeasure: Optional[Callable[[], Mapping[str, float]]] = None,
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
            out.note = "the baseline has no benchmark of this name" if not baseline_entry else "the figure is absent or invalid"
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


# --------------------------------------------------------------------------------------------
# Baseline files (pytest-benchmark's file storage)
# --------------------------------------------------------------------------------------------


@dataclass
class Baseline:
    path: Path
    entries: dict  # fullname -> extra_info
    machine_info: dict = field(default_factory=dict)
    commit_info: dict = field(default_factory=dict)
    datetime: str = ""

    @property
    def label(self) -> str:
        return display_path(self.path)

    def entry(self, fullname: str) -> dict:
        """The baseline ``extra_info`` for a benchmark ({} when the baseline lacks it)."""
        return self.entries.get(fullname, {})


def display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _create_hint(storage: Path) -> str:
    return (
        f"Create one on this machine with:\n    {SAVE_COMMAND}\n"
        f"(it writes {display_path(storage)}/<machine id>/NNNN_baseline.json; commit that file), "
        f"or run without --benchmark-compare to benchmark without the gate."
    )


def locate_baseline(storage: Path, machine_id: str, compare) -> Path:
    """The file ``--benchmark-compare[=compare]`` means, as pytest-benchmark picks it.

    ``compare`` is True (the latest saved run for this machine id), a run number / name prefix
    (``0001``), or a path to a JSON file. Raises BaselineError with a how-to when nothing matches.
    """
    storage = Path(storage)
    if compare is not True:
        candidate = Path(str(compare))
        if candidate.is_file():
            return candidate
    machine_dir = storage / machine_id
    if compare is True:
        files = sorted(machine_dir.glob(SAVED_RUN_GLOB), key=lambda p: p.name)
        wanted = f"{display_path(machine_dir)}/NNNN_*.json"
    else:
        prefix = str(compare).rstrip("*")
        files = sorted(machine_dir.glob(prefix + "*.json"), key=lambda p: p.name)
        wanted = f"{display_path(machine_dir)}/{prefix}*.json"
    if files:
        return files[-1]

    others = sorted(
        {p.parent.name for p in storage.glob("*/" + SAVED_RUN_GLOB) if p.parent.name != machine_id}
    ) if storage.is_dir() else []
    msg = [f"QINS perf gate: no baseline to compare against: nothing matches {wanted} (this machine id is {machine_id!r})."]
    if others:
        msg.append(
            f"Baselines exist only for other machine ids: {', '.join(others)}. They were measured on a "
            f"different platform/Python; compare against one explicitly with --benchmark-compare=<path to its .json> "
            f"if that is really wanted."
        )
    msg.append(_create_hint(storage))
    raise BaselineError("\n".join(msg))


def load_baseline(path: Path) -> Baseline:
    """Read and validate a pytest-benchmark saved run; raise BaselineError if it is unusable."""
    path = Path(path)
    where = display_path(path)
    storage = path.parent.parent if path.parent.parent != path.parent else path.parent
    try:
        text = path.read_text(encoding="utf8")
    except OSError as exc:
        raise BaselineError(f"QINS perf gate: cannot read baseline {where}: {exc.strerror or exc}.\n{_create_hint(storage)}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BaselineError(
            f"QINS perf gate: baseline {where} is corrupt (not valid JSON: {exc}).\n"
            f"Delete it (or restore it from git: git checkout -- {where}). {_create_hint(storage)}"
        ) from None
    problem = _schema_problem(data)
    if problem:
        raise BaselineError(
            f"QINS perf gate: baseline {where} is corrupt or not a pytest-benchmark run ({problem}).\n"
            f"Delete it (or restore it from git: git checkout -- {where}). {_create_hint(storage)}"
        )
    entries = {b["fullname"]: dict(b.get("extra_info") or {}) for b in data["benchmarks"]}
    if not any(e.get(GATE_KEY) for e in entries.values()):
        raise BaselineError(
            f"QINS perf gate: baseline {where} has no gated QINS figures (was it saved by this perf suite?).\n"
            f"{_create_hint(storage)}"
        )
    if any(e.get("inject_slowdown", 1.0) != 1.0 for e in entries.values()):
        raise BaselineError(
            f"QINS perf gate: baseline {where} was measured with an injected slowdown and cannot serve as a baseline.\n"
            f"{_create_hint(storage)}"
        )
    return Baseline(
        path=path,
        entries=entries,
        machine_info=data.get("machine_info") or {},
        commit_info=data.get("commit_info") or {},
        datetime=str(data.get("datetime", "")),
    )


def _schema_problem(data) -> str:
    if not isinstance(data, dict):
        return f"top level is {type(data).__name__}, expected an object"
    benches = data.get("benchmarks")
    if not isinstance(benches, list):
        return "no 'benchmarks' list"
    if not benches:
        return "the 'benchmarks' list is empty"
    for i, b in enumerate(benches):
        if not isinstance(b, dict):
            return f"benchmarks[{i}] is not an object"
        if not isinstance(b.get("fullname"), str):
            return f"benchmarks[{i}] has no 'fullname'"
        stats = b.get("stats")
        if not isinstance(stats, dict) or not isinstance(stats.get("min"), (int, float)):
            return f"benchmarks[{i}] ({b.get('fullname')}) has no numeric 'stats.min'"
        extra = b.get("extra_info", {})
        if not isinstance(extra, dict):
            return f"benchmarks[{i}] ({b['fullname']}) has a non-object 'extra_info'"
        gated = extra.get(GATE_KEY)
        if gated is not None and not (isinstance(gated, list) and all(isinstance(g, str) for g in gated)):
            return f"benchmarks[{i}] ({b['fullname']}) has a malformed '{GATE_KEY}' list"
    return ""


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


# --------------------------------------------------------------------------------------------
# CPU identity: which baselines may gate speed on this machine
# --------------------------------------------------------------------------------------------

#: ISA extensions that change which kernels torch (and the QINS decode) run, so a baseline
#: measured without one of them (or with one this CPU lacks) is other hardware. Compared after
#: dropping underscores (py-cpuinfo lists both ``avx512vnni`` and ``avx512_vnni``).
ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16",
    "avx512vbmi", "avx512fp16", "avxvnni", "amxtile", "amxbf16", "amxint8",
)


def cpu_identity(cpu: Optional[Mapping]) -> dict:
    """The part of py-cpuinfo's record (pytest-benchmark's ``machine_info["cpu"]``) that defines "same CPU".

    Same CPU = same vendor id, same brand string, same family and model number, and the same
    subset of ``ISA_FLAGS``. Clock speed, stepping, cache sizes, core count and the hostname are
    left out (a VM reports them differently from boot to boot).
    """
    cpu = cpu if isinstance(cpu, Mapping) else {}
    flags = {str(f).replace("_", "").lower() for f in (cpu.get("flags") or [])}
    return {
        "vendor": str(cpu.get("vendor_id_raw") or cpu.get("vendor_id") or "?"),
        "brand": " ".join(str(cpu.get("brand_raw") or cpu.get("brand") or "?").split()),
        "family": cpu.get("family"),
        "model": cpu.get("model"),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
    }


def cpu_label(cpu: Optional[Mapping]) -> str:
    """Human-readable: ``AMD EPYC (AuthenticAMD family 26 model 2; avx2 avx512f ...)``."""
    i = cpu_identity(cpu)
    return f"{i['brand']} ({i['vendor']} family {i['family']} model {i['model']}; {' '.join(i['isa']) or 'no AVX2'})"


def cpu_key(cpu: Optional[Mapping]) -> str:
    """A directory name for the per-CPU baseline storage: readable brand/family/model + a hash of the identity."""
    import hashlib
    import re

    i = cpu_identity(cpu)
    digest = hashlib.sha1(json.dumps(i, sort_keys=True).encode()).hexdigest()[:8]
    brand = re.sub(r"[^A-Za-z0-9]+", "_", i["brand"]).strip("_")[:40] or "cpu"
    return f"{brand}-f{i['family']}m{i['model']}-{digest}"


def same_cpu(a: Optional[Mapping], b: Optional[Mapping]) -> bool:
    return cpu_identity(a) == cpu_identity(b)


def baseline_cpu(machine_info: Optional[Mapping]) -> dict:
    return (machine_info or {}).get("cpu") or {} if isinstance(machine_info, Mapping) else {}


def all_saved_runs(storage: Path, machine_id: str) -> list[Path]:
    """Every saved run of this platform/Python under the storage root, any CPU, newest name last.

    Layouts: ``<root>/<cpu key>/<machine id>/NNNN_*.json`` (per-CPU) and the older
    ``<root>/<machine id>/NNNN_*.json``.
    """
    storage = Path(storage)
    if not storage.is_dir():
        return []
    found = list(storage.glob(f"*/{machine_id}/{SAVED_RUN_GLOB}")) + list(storage.glob(f"{machine_id}/{SAVED_RUN_GLOB}"))
    return sorted(set(found), key=lambda p: (p.name, str(p)))


# --------------------------------------------------------------------------------------------
# Same-job A/B: the baseline's revision measured here, paired with this revision
# --------------------------------------------------------------------------------------------


def rule_to_json(rule: Rule) -> dict:
    return {"worse": rule.worse, "tolerance": rule.tolerance, "gain": rule.gain, "min_baseline": rule.min_baseline}


def rule_from_json(d: Mapping) -> Rule:
    return Rule(d.get("worse", HIGHER), float(d.get("tolerance", 0.15)), bool(d.get("gain", False)), d.get("min_baseline"))


#: extra_info key where a benchmark stores its gated figures' rules (for A/B, which has no baseline file).
RULES_KEY = "qins_gate_rules"


@dataclass
class ABOutcome:
    """The A/B verdict on one figure of one benchmark: this revision (new) vs the baseline's (old), both measured here."""

    test: str
    figure: str
    rule: Optional[Rule]
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
    def ratio(self) -> Optional[float]:
        r = self.ratios
        return float(statistics.median(r)) if r else None

    def message(self, rev: str) -> str:
        if self.status == "new":
            return f"{self.test}: {self.figure} not gated: {self.note}"
        pairs = ", ".join(f"{fmt(n)}/{fmt(o)}" for n, o in zip(self.new, self.old))
        head = {"regressed": "REGRESSED", "pass": "ok", "ungated": "not gated", "refuted": "beyond, then REFUTED"}[self.status]
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
                o.status, o.note = "ungated", f"old value below {fmt(rule.min_baseline)}, too close to be told from noise"
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
        rows.append([
            o.test.split("::", 1)[-1], o.figure, " ".join(fmt(v) for v in o.new) or "-", " ".join(fmt(v) for v in o.old) or "-",
            fmt(o.ratio), lim, o.status.upper() if o.failed else o.status,
        ])
    return rows


# --------------------------------------------------------------------------------------------
# Accuracy gate (deterministic figures; any baseline, any CPU)
# --------------------------------------------------------------------------------------------

#: ``benchmark.extra_info[ACCURACY_KEY] = {"<figure>": {"value": float, "kind": "sqnr_db" | "cosine", ...}}``
ACCURACY_KEY = "accuracy"
ACCURACY_KINDS = ("sqnr_db", "cosine", "ppl_increase_pct")
#: accuracy kinds where a larger value is worse (the others: a smaller value is worse)
ACCURACY_HIGHER_IS_WORSE = frozenset({"ppl_increase_pct"})


@dataclass
class AccuracyOutcome:
    test: str
    figure: str
    kind: str
    value: float
    baseline: Optional[float] = None
    tolerance: Optional[float] = None
    baseline_source: Optional[str] = None
    status: str = "pass"  # pass | regressed | new | not-compared | invalid
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("regressed", "invalid")

    @property
    def drop(self) -> Optional[float]:
        """How much worse than the baseline (positive = worse), in the figure's unit."""
        if self.baseline is None:
            return None
        return self.value - self.baseline if self.kind in ACCURACY_HIGHER_IS_WORSE else self.baseline - self.value

    def message(self) -> str:
        unit = {"sqnr_db": " dB", "ppl_increase_pct": " points"}.get(self.kind, "")
        if self.status in ("new", "not-compared", "invalid"):
            return f"{self.test}: accuracy {self.figure} ({self.kind}) = {self.value!r}{unit}: {self.status} ({self.note})"
        head = "REGRESSED" if self.status == "regressed" else "ok"
        return (
            f"{self.test}: accuracy {self.figure} ({self.kind}) {head}: {self.value:.6g}{unit} vs baseline "
            f"{self.baseline:.6g}{unit} (worse by {self.drop:.3g}{unit}; allowed {self.tolerance:.3g}{unit}) "
            f"[baseline: {self.baseline_source}]"
        )


def accuracy_decide(
    test: str,
    current: Optional[Mapping],
    baseline_entry: Optional[Mapping],
    baseline_source: Optional[str],
    sqnr_tol_db: float = 0.5,
    cosine_tol: float = 1e-4,
    ppl_tol_pct: float = 0.05,
) -> list[AccuracyOutcome]:
    """Gate the accuracy figures of one benchmark against the baseline's same figures.

    Fails when an ``sqnr_db`` figure is more than ``sqnr_tol_db`` dB below the baseline's, a
    ``cosine`` figure more than ``cosine_tol`` (absolute) below it, or a ``ppl_increase_pct`` figure
    (perplexity increase over fp32, percent) more than ``ppl_tol_pct`` points above it. Accuracy is deterministic, so
    there is no re-measuring and no CPU-model restriction. A figure the baseline lacks (or whose
    kind differs there) is new and not gated; a malformed current figure fails.
    """
    out: list[AccuracyOutcome] = []
    if not isinstance(current, Mapping):
        return out
    base_acc = (baseline_entry or {}).get(ACCURACY_KEY) if isinstance(baseline_entry, Mapping) else None
    for name, fig in current.items():
        kind = fig.get("kind") if isinstance(fig, Mapping) else None
        value = fig.get("value") if isinstance(fig, Mapping) else None
        o = AccuracyOutcome(test=test, figure=str(name), kind=str(kind), value=value if isinstance(value, (int, float)) else float("nan"),
                            baseline_source=baseline_source)
        out.append(o)
        if kind not in ACCURACY_KINDS or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            o.status, o.note = "invalid", f"expected {{'value': float, 'kind': one of {ACCURACY_KINDS}}}, got {fig!r}"
            continue
        if baseline_entry is None:
            o.status, o.note = "not-compared", "no baseline"
            continue
        b = base_acc.get(name) if isinstance(base_acc, Mapping) else None
        bval = b.get("value") if isinstance(b, Mapping) else None
        if not isinstance(bval, (int, float)) or isinstance(bval, bool) or math.isnan(bval) or b.get("kind") != kind:
            o.status, o.note = "new", f"the baseline has no {kind} figure {name!r}; refresh it with: {SAVE_COMMAND}"
            continue
        o.baseline = float(bval)
        o.tolerance = {"sqnr_db": sqnr_tol_db, "cosine": cosine_tol, "ppl_increase_pct": ppl_tol_pct}[kind]
        worse_by = float(value) - o.baseline if kind in ACCURACY_HIGHER_IS_WORSE else o.baseline - float(value)
        # a figure that was infinite (exact) in the baseline must stay infinite
        o.status = "regressed" if (worse_by > o.tolerance or (math.isinf(o.baseline) and not math.isinf(value))) else "pass"
    return out


#: ``--perf-targets``: the absolute speed targets (perf/test_kernels.py, perf/test_e2e.py) are
#: measured on every CPU and kernel path and stated met or missed in the summary (``report``, the
#: default, so that CI on a CPU that misses one fails only on a regression); ``on`` asserts them, for
#: a developer verifying a change on their own CPU. Memory targets are asserted always.
TARGET_CHOICES = ("report", "on")


def speed_targets_asserted(option: str) -> bool:
    """Whether a missed absolute speed target fails its test under ``--perf-targets=option``."""
    if option not in TARGET_CHOICES:
        raise ValueError(f"--perf-targets must be one of {', '.join(TARGET_CHOICES)}, got {option!r}")
    return option == "on"


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
