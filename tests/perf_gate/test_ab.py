"""Same-job A/B verdicts (perf/ab_verdicts.py) on synthetic rounds of both revisions."""
from __future__ import annotations

import pytest

from perf import gate as G
from perf.ab_verdicts import (
    ab_decide,
)
from perf.gate import LOWER, Rule
from tests.perf_gate.support import (
    ab_info,
)

# --------------------------------------------------------------------------------------------
# A/B pairing and verdicts (synthetic rounds)
# --------------------------------------------------------------------------------------------


def test_ab_like_work_passes_and_regresses():
    new = [{"t::a": ab_info(1.10)}, {"t::a": ab_info(1.10)}]
    (o,) = ab_decide(new, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.02)}])
    assert o.status == "pass" and o.ratios == pytest.approx([1.10, 1.10 / 1.02])
    (o,) = ab_decide([{"t::a": ab_info(1.5)}] * 2, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.1)}])
    assert o.status == "regressed" and o.failed
    msg = o.message("0123456789abcdef")
    assert "REGRESSED" in msg and "0123456789ab" in msg and "measured here" in msg


def test_ab_fails_only_beyond_in_most_rounds():
    # beyond the limit in one round of two (old side ran fast once): not a regression
    (o,) = ab_decide([{"t::a": ab_info(1.3)}] * 2, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.25)}])
    assert o.status == "pass" and "1 of 2" in o.note
    # three rounds: two of three beyond -> regressed
    (o,) = ab_decide(
        [{"t::a": ab_info(1.3)}] * 3, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.25)}, {"t::a": ab_info(1.0)}]
    )
    assert o.status == "regressed"


def test_ab_benchmark_the_old_revision_cannot_run_is_new_not_gated():
    new = [{"t::a": ab_info(1.0), "t::brand_new": ab_info(50.0)}] * 2
    old = [{"t::a": ab_info(1.0)}] * 2
    outs = {o.test: o for o in ab_decide(new, old)}
    assert outs["t::brand_new"].status == "new" and not outs["t::brand_new"].failed
    assert "not gated" in outs["t::brand_new"].message("abc")
    assert outs["t::a"].status == "pass"


def test_ab_figure_the_old_revision_does_not_measure_is_new():
    new = [{"t::a": ab_info(3.0, figure="ratio_same_kind")}] * 2
    old = [{"t::a": {"ratio_vs_linear": 70.0, G.GATE_KEY: ["ratio_vs_linear"]}}] * 2
    (o,) = ab_decide(new, old)
    assert o.figure == "ratio_same_kind" and o.status == "new"


def test_ab_speedup_gain_and_min_baseline():
    gain = Rule(LOWER, 0.5, gain=True, min_baseline=1.5)
    new = [{"t::nc": ab_info(1.05, "cache_speedup", gain)}] * 2
    (o,) = ab_decide(new, [{"t::nc": ab_info(2.8, "cache_speedup", gain)}] * 2)
    assert o.status == "regressed"  # a KV cache that stopped working
    (o,) = ab_decide(new, [{"t::nc": ab_info(1.2, "cache_speedup", gain)}] * 2)
    assert o.status == "ungated"


def test_ab_needs_paired_rounds():
    with pytest.raises(ValueError):
        ab_decide([{"t::a": ab_info(1.0)}], [])
