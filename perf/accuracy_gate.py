"""The accuracy gate: deterministic accuracy figures against any baseline, on any CPU.

A benchmark stores its accuracy figures in ``extra_info[ACCURACY_KEY]``; they are compared with the
same figures of any baseline (accuracy does not depend on the CPU), without re-measuring.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from perf.gate import SAVE_COMMAND

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
    baseline: float | None = None
    tolerance: float | None = None
    baseline_source: str | None = None
    status: str = "pass"  # pass | regressed | new | not-compared | invalid
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("regressed", "invalid")

    @property
    def drop(self) -> float | None:
        """How much worse than the baseline (positive = worse), in the figure's unit."""
        if self.baseline is None:
            return None
        return self.value - self.baseline if self.kind in ACCURACY_HIGHER_IS_WORSE else self.baseline - self.value

    def message(self) -> str:
        unit = {"sqnr_db": " dB", "ppl_increase_pct": " points"}.get(self.kind, "")
        if self.status in ("new", "not-compared", "invalid"):
            return (
                f"{self.test}: accuracy {self.figure} ({self.kind}) = {self.value!r}{unit}: {self.status} ({self.note})"
            )
        head = "REGRESSED" if self.status == "regressed" else "ok"
        return (
            f"{self.test}: accuracy {self.figure} ({self.kind}) {head}: {self.value:.6g}{unit} vs baseline "
            f"{self.baseline:.6g}{unit} (worse by {self.drop:.3g}{unit}; allowed {self.tolerance:.3g}{unit}) "
            f"[baseline: {self.baseline_source}]"
        )


def accuracy_decide(
    test: str,
    current: Mapping | None,
    baseline_entry: Mapping | None,
    baseline_source: str | None,
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
        o = AccuracyOutcome(
            test=test,
            figure=str(name),
            kind=str(kind),
            value=value if isinstance(value, (int, float)) else float("nan"),
            baseline_source=baseline_source,
        )
        out.append(o)
        if (
            kind not in ACCURACY_KINDS
            or not isinstance(value, (int, float))
            or isinstance(value, bool)
            or math.isnan(value)
        ):
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
        o.status = (
            "regressed" if (worse_by > o.tolerance or (math.isinf(o.baseline) and not math.isinf(value))) else "pass"
        )
    return out
