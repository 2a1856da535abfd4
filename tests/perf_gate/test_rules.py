"""The perf gate's rules and its confirm-before-fail decision (perf/gate.py), on synthetic figures."""
from __future__ import annotations

import pytest

from perf import gate as G
from perf.gate import HIGHER, LOWER, Rule

# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def test_rule_higher_is_worse():
    r = Rule(HIGHER, 0.15)
    assert r.limit(2.0) == pytest.approx(2.3)
    assert not r.exceeds(2.29, 2.0)
    assert r.exceeds(2.31, 2.0)
    assert r.exceeds(float("nan"), 2.0)


def test_rule_speedup_gain():
    r = Rule(LOWER, 0.5, gain=True)
    # baseline speedup 3.0: at least half of the gain over 1 must remain, i.e. >= 2.0
    assert r.limit(3.0) == pytest.approx(2.0)
    assert not r.exceeds(2.1, 3.0)
    assert r.exceeds(1.9, 3.0)
    assert r.exceeds(1.0, 3.0)  # a KV cache that stopped working


def test_rule_rejects_nonsense():
    with pytest.raises(ValueError):
        Rule("sideways", 0.1)
    with pytest.raises(ValueError):
        Rule(HIGHER, -0.1)
    with pytest.raises(ValueError):
        Rule(HIGHER, 0.1, gain=True)


def test_paired_ratio_median_shrugs_off_bursts():
    target = [1.0, 1.0, 9.0, 1.0, 1.0]  # one burst on the target side
    ref = [1.0, 5.0, 1.0, 1.0, 1.0]  # one on the reference side
    assert G.robust_ratio(G.paired_ratios(target, ref)) == 1.0
    with pytest.raises(ValueError):
        G.paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        G.paired_ratios([1.0], [0.0])


# --------------------------------------------------------------------------------------------
# decide(): confirm before failing
# --------------------------------------------------------------------------------------------

RULES = {"ratio_vs_linear": Rule(HIGHER, 0.15)}
BASE = {"ratio_vs_linear": 1.0, G.GATE_KEY: ["ratio_vs_linear"]}


class Remeasure:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return {"ratio_vs_linear": self.value}


def test_within_tolerance_passes_without_remeasuring():
    again = Remeasure(5.0)
    (o,) = G.decide("t::a", {"ratio_vs_linear": 1.12}, RULES, BASE, "base.json", again)
    assert o.status == "pass" and not o.failed
    assert again.calls == 0


def test_beyond_tolerance_fails_once_confirmed():
    again = Remeasure(1.48)
    (o,) = G.decide(
        "perf/x.py::t[a]", {"ratio_vs_linear": 1.52}, RULES, BASE, ".benchmarks/M/0001_baseline.json", again
    )
    assert again.calls == 1
    assert o.status == "regressed" and o.failed
    msg = o.message()
    assert "ratio_vs_linear" in msg and "REGRESSED" in msg
    assert "+48.0%" in msg  # the better of the two measurements decides
    assert ".benchmarks/M/0001_baseline.json" in msg
    assert "1.52" in msg and "1.48" in msg and "1.15" in msg  # both measurements and the limit


def test_excess_not_confirmed_passes():
    again = Remeasure(1.05)
    (o,) = G.decide("t::a", {"ratio_vs_linear": 1.9}, RULES, BASE, "b.json", again)
    assert again.calls == 1
    assert o.status == "unconfirmed" and not o.failed


def test_remeasure_called_once_for_several_figures():
    rules = {"a": Rule(HIGHER, 0.1), "b": Rule(HIGHER, 0.1), "c": Rule(HIGHER, 0.1)}
    calls = []

    def again():
        calls.append(1)
        return {"a": 2.0, "b": 1.0}

    out = G.decide("t", {"a": 2.0, "b": 2.0, "c": 1.0}, rules, {"a": 1.0, "b": 1.0, "c": 1.0}, "b.json", again)
    assert len(calls) == 1
    assert [o.status for o in out] == ["regressed", "unconfirmed", "pass"]


def test_deterministic_figure_without_remeasure_fails_at_once():
    (o,) = G.decide(
        "t", {"model_bytes": 110.0}, {"model_bytes": Rule(HIGHER, 0.01)}, {"model_bytes": 100.0}, "b.json", None
    )
    assert o.status == "regressed"


def test_collapsed_kv_cache_speedup_fails():
    rules = {"cache_speedup": Rule(LOWER, 0.5, gain=True, min_baseline=1.5)}
    (o,) = G.decide(
        "t", {"cache_speedup": 1.02}, rules, {"cache_speedup": 2.8}, "b.json", lambda: {"cache_speedup": 0.99}
    )
    assert o.status == "regressed"
    assert "-63.6%" in o.message()  # the better of 1.02 and 0.99 decides


def test_speedup_too_small_in_baseline_is_recorded_not_gated():
    rules = {"cache_speedup": Rule(LOWER, 0.5, gain=True, min_baseline=1.5)}
    (o,) = G.decide("t", {"cache_speedup": 1.0}, rules, {"cache_speedup": 1.1}, "b.json", None)
    assert o.status == "ungated" and not o.failed


def test_missing_figure_in_baseline_fails_with_how_to():
    (o,) = G.decide("perf/x.py::t[new]", {"ratio_vs_linear": 1.0}, RULES, {}, "b.json", None)
    assert o.status == "missing" and o.failed
    assert G.SAVE_COMMAND in o.message() and "b.json" in o.message()


def test_not_compared_never_fails():
    (o,) = G.decide("t", {"ratio_vs_linear": 99.0}, RULES, None, None, None)
    assert o.status == "not-compared" and not o.failed
