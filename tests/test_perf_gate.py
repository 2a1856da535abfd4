"""Tests of the perf gate itself (perf/gate.py, perf/plugin.py), fed synthetic benchmark results.

* pure logic: rules, the confirm-before-fail decision, baseline location and validation;
* the plugin inside a real pytest + pytest-benchmark run (a subprocess on a synthetic suite whose
  "measurements" come from environment variables): pass within tolerance, fail beyond it with the
  figure / change / baseline named, missing or corrupt baselines reported without a traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perf import gate as G
from perf.gate import HIGHER, LOWER, BaselineError, Rule

ROOT = Path(__file__).resolve().parent.parent
MACHINE = "Linux-CPython-3.11-64bit"


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
    (o,) = G.decide("perf/x.py::t[a]", {"ratio_vs_linear": 1.52}, RULES, BASE, ".benchmarks/M/0001_baseline.json", again)
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
    (o,) = G.decide("t", {"model_bytes": 110.0}, {"model_bytes": Rule(HIGHER, 0.01)}, {"model_bytes": 100.0}, "b.json", None)
    assert o.status == "regressed"


def test_collapsed_kv_cache_speedup_fails():
    rules = {"cache_speedup": Rule(LOWER, 0.5, gain=True, min_baseline=1.5)}
    (o,) = G.decide("t", {"cache_speedup": 1.02}, rules, {"cache_speedup": 2.8}, "b.json", lambda: {"cache_speedup": 0.99})
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


# --------------------------------------------------------------------------------------------
# Baseline files
# --------------------------------------------------------------------------------------------


def saved_run(figures_by_test: dict, **extra) -> dict:
    """A minimal run as pytest-benchmark saves it (--benchmark-save)."""
    benches = []
    for fullname, figures in figures_by_test.items():
        info = dict(figures)
        gated = sorted(k for k in figures if k.startswith("ratio"))
        if gated:
            info[G.GATE_KEY] = gated
        benches.append({"fullname": fullname, "name": fullname.split("::")[-1], "group": None, "extra_info": info,
                        "stats": {"min": 0.001, "max": 0.002, "mean": 0.0015, "median": 0.0015, "rounds": 5}})
    data = {"machine_info": {"node": "x"}, "commit_info": {}, "benchmarks": benches, "datetime": "2026-01-01T00:00:00", "version": "5.3.1"}
    data.update(extra)
    return data


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_locate_latest_and_load(tmp_path):
    store = tmp_path / ".benchmarks"
    write(store / MACHINE / "0001_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 2.0}}))
    newest = write(store / MACHINE / "0002_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 3.0}}))
    path = G.locate_baseline(store, MACHINE, True)
    assert path == newest
    b = G.load_baseline(path)
    assert b.entry("a::t")["ratio_vs_linear"] == 3.0
    assert b.entry("a::unknown") == {}
    assert G.locate_baseline(store, MACHINE, "0001").name == "0001_baseline.json"
    assert G.locate_baseline(store, MACHINE, str(newest)) == newest


def test_missing_baseline_says_how_to_create_one(tmp_path):
    with pytest.raises(BaselineError) as e:
        G.locate_baseline(tmp_path / ".benchmarks", MACHINE, True)
    msg = str(e.value)
    assert "no baseline" in msg and MACHINE in msg and G.SAVE_COMMAND in msg


def test_baseline_of_another_machine_is_named(tmp_path):
    store = tmp_path / ".benchmarks"
    write(store / "Linux-CPython-3.12-64bit" / "0001_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 2.0}}))
    with pytest.raises(BaselineError) as e:
        G.locate_baseline(store, MACHINE, True)
    assert "Linux-CPython-3.12-64bit" in str(e.value) and G.SAVE_COMMAND in str(e.value)


def test_unmatched_run_number(tmp_path):
    store = tmp_path / ".benchmarks"
    write(store / MACHINE / "0001_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 2.0}}))
    with pytest.raises(BaselineError, match="0007"):
        G.locate_baseline(store, MACHINE, "0007")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        (json.dumps({"benchmarks": "nope"}), "no 'benchmarks' list"),
        (json.dumps({"benchmarks": []}), "empty"),
        (json.dumps({"benchmarks": [{"fullname": "a", "stats": {}}]}), "stats.min"),
        (json.dumps({"benchmarks": [{"fullname": "a", "stats": {"min": 1}, "extra_info": {G.GATE_KEY: 3}}]}), "malformed"),
    ],
)
def test_corrupt_baseline_is_reported_clearly(tmp_path, content, expected):
    path = write(tmp_path / ".benchmarks" / MACHINE / "0001_baseline.json", content)
    with pytest.raises(BaselineError) as e:
        G.load_baseline(path)
    msg = str(e.value)
    assert expected in msg and "corrupt" in msg and G.SAVE_COMMAND in msg and "0001_baseline.json" in msg


def test_baseline_without_gate_figures_is_rejected(tmp_path):
    data = saved_run({"a::t": {"something": 1.0}})
    path = write(tmp_path / "s" / MACHINE / "0001_x.json", data)
    with pytest.raises(BaselineError, match="no gated QINS figures"):
        G.load_baseline(path)


def test_baseline_measured_with_injected_slowdown_is_rejected(tmp_path):
    data = saved_run({"a::t": {"ratio_vs_linear": 1.0, "inject_slowdown": 1.5}})
    path = write(tmp_path / "s" / MACHINE / "0001_x.json", data)
    with pytest.raises(BaselineError, match="injected slowdown"):
        G.load_baseline(path)


# --------------------------------------------------------------------------------------------
# The plugin in a real pytest run (subprocess, synthetic suite)
# --------------------------------------------------------------------------------------------

SYNTH_CONFTEST = textwrap.dedent(
    """
    from perf.plugin import (  # the same hooks and fixtures perf/conftest.py installs
        perf_gate, perf_state, pytest_addoption, pytest_benchmark_update_json,
        pytest_benchmark_update_machine_info, pytest_configure, pytest_report_header,
        pytest_runtest_call, pytest_sessionfinish, pytest_sessionstart, pytest_terminal_summary,
    )
    """
)

SYNTH_TEST = textwrap.dedent(
    """
    import os, time
    from perf.gate import HIGHER, Rule

    def test_layer(benchmark, perf_gate):
        first = float(os.environ["SYNTH_FIRST"])
        again = float(os.environ.get("SYNTH_AGAIN", first))
        sleep = float(os.environ.get("SYNTH_SLEEP", "0"))
        benchmark.pedantic(lambda: time.sleep(sleep), rounds=3)
        perf_gate.check(
            benchmark,
            {"ratio_vs_linear": first},
            {"ratio_vs_linear": Rule(HIGHER, 0.15)},
            lambda: {"ratio_vs_linear": again},
        )
    """
)


@pytest.fixture
def synth(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(SYNTH_CONFTEST)
    (tmp_path / "test_synth.py").write_text(SYNTH_TEST)

    def run(*args, first=1.0, again=None, sleep=0.0, backstop="off", clock="auto"):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["SYNTH_FIRST"] = str(first)
        env["SYNTH_SLEEP"] = str(sleep)
        env.pop("QINS_PERF_INJECT_SLOWDOWN", None)
        if again is not None:
            env["SYNTH_AGAIN"] = str(again)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
               f"--perf-backstop={backstop}", f"--perf-clock={clock}", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    run.path = tmp_path
    return run


def saved_files(tmp_path: Path) -> list:
    return sorted((tmp_path / ".benchmarks").rglob("*.json"))


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


def test_plugin_refuses_to_save_an_injected_run(synth):
    rc, out = synth("--benchmark-save=baseline", "--perf-inject-slowdown=1.5")
    assert rc == 4, out
    assert "injected slowdown" in out and "Traceback" not in out
