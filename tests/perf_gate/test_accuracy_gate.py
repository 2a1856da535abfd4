"""The accuracy gate (perf/accuracy_gate.py) on synthetic figures."""
from __future__ import annotations

import pytest

from perf.accuracy_gate import ACCURACY_KEY, accuracy_decide

# --------------------------------------------------------------------------------------------
# Accuracy gate
# --------------------------------------------------------------------------------------------


def acc(**figs):
    return {name: {"value": v, "kind": k, "int8_per_channel": 30.0} for name, (v, k) in figs.items()}


def test_accuracy_sqnr_drop():
    base = {ACCURACY_KEY: acc(layer=(40.0, "sqnr_db"))}
    (o,) = accuracy_decide("t", acc(layer=(39.6, "sqnr_db")), base, "b.json")
    assert o.status == "pass"
    (o,) = accuracy_decide("t", acc(layer=(41.0, "sqnr_db")), base, "b.json")
    assert o.status == "pass"  # better is fine
    (o,) = accuracy_decide("t", acc(layer=(39.4, "sqnr_db")), base, "b.json")
    assert o.status == "regressed" and o.failed
    assert "REGRESSED" in o.message() and "dB" in o.message() and "b.json" in o.message()
    (o,) = accuracy_decide("t", acc(layer=(39.4, "sqnr_db")), base, "b.json", sqnr_tol_db=1.0)
    assert o.status == "pass"


def test_accuracy_cosine_drop():
    base = {ACCURACY_KEY: acc(out=(0.99990, "cosine"))}
    (o,) = accuracy_decide("t", acc(out=(0.99985, "cosine")), base, "b.json")
    assert o.status == "pass"
    (o,) = accuracy_decide("t", acc(out=(0.99970, "cosine")), base, "b.json")
    assert o.status == "regressed"
    (o,) = accuracy_decide("t", acc(out=(0.99970, "cosine")), base, "b.json", cosine_tol=1e-3)
    assert o.status == "pass"


def test_a_perplexity_increase_regresses_when_it_rises_past_its_tolerance_not_when_it_falls():
    base = {ACCURACY_KEY: acc(ppl=(0.30, "ppl_increase_pct"))}
    (o,) = accuracy_decide("t", acc(ppl=(0.34, "ppl_increase_pct")), base, "b.json")
    assert o.status == "pass"
    (o,) = accuracy_decide("t", acc(ppl=(-0.50, "ppl_increase_pct")), base, "b.json")
    assert o.status == "pass" and o.drop == pytest.approx(-0.80)  # lower is better
    (o,) = accuracy_decide("t", acc(ppl=(0.36, "ppl_increase_pct")), base, "b.json")
    assert o.status == "regressed" and o.failed and o.drop == pytest.approx(0.06)
    assert "REGRESSED" in o.message() and "points" in o.message()
    (o,) = accuracy_decide("t", acc(ppl=(0.36, "ppl_increase_pct")), base, "b.json", ppl_tol_pct=0.1)
    assert o.status == "pass"


def test_accuracy_new_invalid_and_uncompared():
    base = {ACCURACY_KEY: acc(layer=(40.0, "sqnr_db"))}
    outs = accuracy_decide("t", acc(other=(10.0, "sqnr_db"), layer=(0.5, "cosine")), base, "b.json")
    assert [o.status for o in outs] == ["new", "new"]  # absent, or of another kind, in the baseline
    (o,) = accuracy_decide("t", {"x": {"value": "high", "kind": "sqnr_db"}}, base, "b.json")
    assert o.status == "invalid" and o.failed
    (o,) = accuracy_decide("t", {"x": {"value": 1.0, "kind": "psnr"}}, base, "b.json")
    assert o.status == "invalid"
    (o,) = accuracy_decide("t", acc(layer=(1.0, "sqnr_db")), None, None)
    assert o.status == "not-compared" and not o.failed
