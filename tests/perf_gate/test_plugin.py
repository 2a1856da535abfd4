"""The perf plugin inside a real pytest + pytest-benchmark run (a subprocess on a synthetic suite whose
"measurements" come from environment variables): pass within tolerance, fail beyond it with the figure,
change and baseline named, missing or corrupt baselines reported without a traceback."""
from __future__ import annotations

import json

import pytest

from perf import gate as G
from perf.ab_verdicts import (
    backstop_decide,
)
from tests.perf_gate.support import (
    saved_files,
)

# --------------------------------------------------------------------------------------------
# The plugin in a real pytest run (subprocess, synthetic suite)
# --------------------------------------------------------------------------------------------


def test_plugin_missing_baseline_is_a_clear_usage_error(synth):
    rc, out = synth("--benchmark-compare")
    assert rc == 4, out
    assert "no baseline to compare against" in out and G.SAVE_COMMAND in out
    assert "Traceback" not in out


def test_plugin_corrupt_baseline_is_a_clear_usage_error(synth):
    rc, out = synth("--benchmark-save=baseline", first=1.0)
    assert rc == 0, out
    (path,) = saved_files(synth.path)
    path.write_text('{"benchmarks": [ {"fullname": ')  # truncated, as by a bad merge or a full disk
    rc, out = synth("--benchmark-compare")
    assert rc == 4, out
    assert "corrupt" in out and path.name in out and G.SAVE_COMMAND in out
    assert "Traceback" not in out


def test_plugin_gate_pass_regress_confirm(synth):
    rc, out = synth("--benchmark-save=baseline", first=2.0)
    assert rc == 0, out
    (path,) = saved_files(synth.path)
    assert json.loads(path.read_text())["benchmarks"][0]["extra_info"]["ratio_vs_linear"] == 2.0

    rc, out = synth("--benchmark-compare", first=2.2)  # +10%, within 15%
    assert rc == 0, out
    assert "gate passed" in out

    rc, out = synth("--benchmark-compare", first=3.0, again=2.9)  # +50%, confirmed
    assert rc == 1, out
    assert "REGRESSED" in out and "ratio_vs_linear" in out and "+45.0%" in out and path.name in out
    assert "Traceback" not in out

    rc, out = synth("--benchmark-compare", first=3.0, again=2.1)  # a one-off excess
    assert rc == 0, out
    assert "not confirmed" in out or "unconfirmed" in out


def test_plugin_absolute_backstop_fails_without_traceback(synth):
    # sleeping takes no CPU time: time the wall clock here
    rc, out = synth("--benchmark-save=baseline", first=1.0, sleep=0.001, clock="wall")
    assert rc == 0, out
    rc, out = synth("--benchmark-compare", first=1.0, sleep=0.05, backstop="min:900%", clock="wall")
    assert rc == 1, out
    assert "Performance has regressed" in out and "backstop" in out
    assert "Traceback" not in out


def test_backstop_decide_confirms_only_when_most_rounds_exceed_the_limit():
    assert backstop_decide([20.0, 21.0], [1.8, 1.9], 10.0)[0]  # 11.1x and 11.1x
    ok, how = backstop_decide([20.0, 1.9], [1.8, 1.8], 10.0)  # one round of two beyond: not more than half
    assert not ok and "11.11x" in how and "1.06x" in how and "limit 10x" in how
    assert not backstop_decide([1.0, 1.1, 30.0], [1.0, 1.0, 1.0], 10.0)[0]
    assert backstop_decide([5.0], [0.0], 10.0)[0]  # an old time of 0: beyond any limit
    with pytest.raises(ValueError, match="as many rounds"):
        backstop_decide([1.0], [1.0, 1.0], 10.0)


def test_plugin_refuses_to_save_an_injected_run(synth):
    rc, out = synth("--benchmark-save=baseline", "--perf-inject-slowdown=1.5")
    assert rc == 4, out
    assert "injected slowdown" in out and "Traceback" not in out
