"""Tests of the perf gate itself (perf/gate.py, perf/plugin.py), fed synthetic benchmark results.

* pure logic: rules, the confirm-before-fail decision, baseline location and validation;
* the plugin inside a real pytest + pytest-benchmark run (a subprocess on a synthetic suite whose
  "measurements" come from environment variables): pass within tolerance, fail beyond it with the
  figure / change / baseline named, missing or corrupt baselines reported without a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perf import gate as G
from perf.gate import HIGHER, LOWER, BaselineError, Rule

ROOT = Path(__file__).resolve().parent.parent
#: how the synthetic suites below are run: in a subprocess, ...
PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q")
#: ... and so are the A/B's runs they start (inherited): without Hypothesis' pytest plugin. They use
#: no Hypothesis; importing it cost each run ~1.3 s of its ~2.9 s (AMD EPYC family 23 model 1).
NO_HYPOTHESIS = {"PYTEST_ADDOPTS": "-p no:hypothesispytest"}
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

    def run(*args, first=1.0, again=None, sleep=0.0, backstop="off", clock="cpu"):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["SYNTH_FIRST"] = str(first)
        env["SYNTH_SLEEP"] = str(sleep)
        env.pop("QINS_PERF_INJECT_SLOWDOWN", None)
        env.update(NO_HYPOTHESIS)
        if again is not None:
            env["SYNTH_AGAIN"] = str(again)
        cmd = [*PYTEST, f"--perf-backstop={backstop}", f"--perf-clock={clock}", *args]
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


def test_backstop_decide_confirms_only_when_most_rounds_exceed_the_limit():
    assert G.backstop_decide([20.0, 21.0], [1.8, 1.9], 10.0)[0]  # 11.1x and 11.1x
    ok, how = G.backstop_decide([20.0, 1.9], [1.8, 1.8], 10.0)  # one round of two beyond: not more than half
    assert not ok and "11.11x" in how and "1.06x" in how and "limit 10x" in how
    assert not G.backstop_decide([1.0, 1.1, 30.0], [1.0, 1.0, 1.0], 10.0)[0]
    assert G.backstop_decide([5.0], [0.0], 10.0)[0]  # an old time of 0: beyond any limit
    with pytest.raises(ValueError, match="as many rounds"):
        G.backstop_decide([1.0], [1.0, 1.0], 10.0)


def test_plugin_refuses_to_save_an_injected_run(synth):
    rc, out = synth("--benchmark-save=baseline", "--perf-inject-slowdown=1.5")
    assert rc == 4, out
    assert "injected slowdown" in out and "Traceback" not in out


# --------------------------------------------------------------------------------------------
# Per-CPU baselines: what "same CPU" means
# --------------------------------------------------------------------------------------------

XEON = {"vendor_id_raw": "GenuineIntel", "brand_raw": "Intel(R) Xeon(R) Processor", "family": 6, "model": 207,
        "stepping": 2, "hz_actual_friendly": "2.1000 GHz", "flags": ["avx2", "avx512f", "avx512_vnni", "avx512vbmi", "amx_tile", "sse2"]}
EPYC = {"vendor_id_raw": "AuthenticAMD", "brand_raw": "AMD EPYC", "family": 26, "model": 2, "stepping": 1,
        "flags": ["avx2", "avx512f", "avx512vbmi", "avx512_bf16", "sse2"]}


def test_same_cpu_ignores_clock_stepping_and_non_isa_flags():
    other_boot = dict(XEON, stepping=3, hz_actual_friendly="2.0 GHz", flags=XEON["flags"] + ["hypervisor", "rdpid"])
    assert G.same_cpu(XEON, other_boot)
    assert G.cpu_key(XEON) == G.cpu_key(other_boot)


@pytest.mark.parametrize(
    "change",
    [
        {"brand_raw": "Intel(R) Xeon(R) Platinum 8480"},
        {"vendor_id_raw": "AuthenticAMD"},
        {"family": 25},
        {"model": 143},
        {"flags": ["avx2", "avx512f", "avx512vnni", "avx512vbmi", "sse2"]},  # no AMX
        {"flags": ["avx2", "avx512_vnni", "avx512vbmi", "amx_tile", "sse2"]},  # no AVX-512F
    ],
)
def test_different_cpu(change):
    other = dict(XEON, **change)
    assert not G.same_cpu(XEON, other)
    assert G.cpu_key(XEON) != G.cpu_key(other)


def test_isa_flags_compared_without_underscores():
    assert G.same_cpu(dict(XEON, flags=["avx512_vnni"]), dict(XEON, flags=["avx512vnni"]))
    assert "amxtile" in G.cpu_identity(XEON)["isa"] and "sse2" not in G.cpu_identity(XEON)["isa"]
    assert "AMD EPYC" in G.cpu_label(EPYC) and "family 26 model 2" in G.cpu_label(EPYC)


def test_all_saved_runs_finds_every_cpu_and_the_old_layout(tmp_path):
    store = tmp_path / ".benchmarks"
    a = write(store / G.cpu_key(XEON) / MACHINE / "0001_baseline.json", "{}")
    b = write(store / G.cpu_key(EPYC) / MACHINE / "0001_baseline.json", "{}")
    c = write(store / MACHINE / "0002_baseline.json", "{}")
    write(store / G.cpu_key(EPYC) / "Linux-CPython-3.12-64bit" / "0003_baseline.json", "{}")  # other Python
    assert set(G.all_saved_runs(store, MACHINE)) == {a, b, c}
    assert G.all_saved_runs(tmp_path / "nothing", MACHINE) == []


# --------------------------------------------------------------------------------------------
# A/B pairing and verdicts (synthetic rounds)
# --------------------------------------------------------------------------------------------


def ab_info(value, figure="ratio_vs_linear", rule=Rule(HIGHER, 0.15)):
    return {figure: value, G.GATE_KEY: [figure], G.RULES_KEY: {figure: G.rule_to_json(rule)}}


def test_ab_like_work_passes_and_regresses():
    new = [{"t::a": ab_info(1.10)}, {"t::a": ab_info(1.10)}]
    (o,) = G.ab_decide(new, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.02)}])
    assert o.status == "pass" and o.ratios == pytest.approx([1.10, 1.10 / 1.02])
    (o,) = G.ab_decide([{"t::a": ab_info(1.5)}] * 2, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.1)}])
    assert o.status == "regressed" and o.failed
    msg = o.message("0123456789abcdef")
    assert "REGRESSED" in msg and "0123456789ab" in msg and "measured here" in msg


def test_ab_fails_only_beyond_in_most_rounds():
    # beyond the limit in one round of two (old side ran fast once): not a regression
    (o,) = G.ab_decide([{"t::a": ab_info(1.3)}] * 2, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.25)}])
    assert o.status == "pass" and "1 of 2" in o.note
    # three rounds: two of three beyond -> regressed
    (o,) = G.ab_decide([{"t::a": ab_info(1.3)}] * 3, [{"t::a": ab_info(1.0)}, {"t::a": ab_info(1.25)}, {"t::a": ab_info(1.0)}])
    assert o.status == "regressed"


def test_ab_benchmark_the_old_revision_cannot_run_is_new_not_gated():
    new = [{"t::a": ab_info(1.0), "t::brand_new": ab_info(50.0)}] * 2
    old = [{"t::a": ab_info(1.0)}] * 2
    outs = {o.test: o for o in G.ab_decide(new, old)}
    assert outs["t::brand_new"].status == "new" and not outs["t::brand_new"].failed
    assert "not gated" in outs["t::brand_new"].message("abc")
    assert outs["t::a"].status == "pass"


def test_ab_figure_the_old_revision_does_not_measure_is_new():
    new = [{"t::a": ab_info(3.0, figure="ratio_same_kind")}] * 2
    old = [{"t::a": {"ratio_vs_linear": 70.0, G.GATE_KEY: ["ratio_vs_linear"]}}] * 2
    (o,) = G.ab_decide(new, old)
    assert o.figure == "ratio_same_kind" and o.status == "new"


def test_ab_speedup_gain_and_min_baseline():
    gain = Rule(LOWER, 0.5, gain=True, min_baseline=1.5)
    new = [{"t::nc": ab_info(1.05, "cache_speedup", gain)}] * 2
    (o,) = G.ab_decide(new, [{"t::nc": ab_info(2.8, "cache_speedup", gain)}] * 2)
    assert o.status == "regressed"  # a KV cache that stopped working
    (o,) = G.ab_decide(new, [{"t::nc": ab_info(1.2, "cache_speedup", gain)}] * 2)
    assert o.status == "ungated"


def test_ab_needs_paired_rounds():
    with pytest.raises(ValueError):
        G.ab_decide([{"t::a": ab_info(1.0)}], [])


# --------------------------------------------------------------------------------------------
# Accuracy gate
# --------------------------------------------------------------------------------------------


def acc(**figs):
    return {name: {"value": v, "kind": k, "int8_per_channel": 30.0} for name, (v, k) in figs.items()}


def test_accuracy_sqnr_drop():
    base = {G.ACCURACY_KEY: acc(layer=(40.0, "sqnr_db"))}
    (o,) = G.accuracy_decide("t", acc(layer=(39.6, "sqnr_db")), base, "b.json")
    assert o.status == "pass"
    (o,) = G.accuracy_decide("t", acc(layer=(41.0, "sqnr_db")), base, "b.json")
    assert o.status == "pass"  # better is fine
    (o,) = G.accuracy_decide("t", acc(layer=(39.4, "sqnr_db")), base, "b.json")
    assert o.status == "regressed" and o.failed
    assert "REGRESSED" in o.message() and "dB" in o.message() and "b.json" in o.message()
    (o,) = G.accuracy_decide("t", acc(layer=(39.4, "sqnr_db")), base, "b.json", sqnr_tol_db=1.0)
    assert o.status == "pass"


def test_accuracy_cosine_drop():
    base = {G.ACCURACY_KEY: acc(out=(0.99990, "cosine"))}
    (o,) = G.accuracy_decide("t", acc(out=(0.99985, "cosine")), base, "b.json")
    assert o.status == "pass"
    (o,) = G.accuracy_decide("t", acc(out=(0.99970, "cosine")), base, "b.json")
    assert o.status == "regressed"
    (o,) = G.accuracy_decide("t", acc(out=(0.99970, "cosine")), base, "b.json", cosine_tol=1e-3)
    assert o.status == "pass"


def test_a_perplexity_increase_regresses_when_it_rises_past_its_tolerance_not_when_it_falls():
    base = {G.ACCURACY_KEY: acc(ppl=(0.30, "ppl_increase_pct"))}
    (o,) = G.accuracy_decide("t", acc(ppl=(0.34, "ppl_increase_pct")), base, "b.json")
    assert o.status == "pass"
    (o,) = G.accuracy_decide("t", acc(ppl=(-0.50, "ppl_increase_pct")), base, "b.json")
    assert o.status == "pass" and o.drop == pytest.approx(-0.80)  # lower is better
    (o,) = G.accuracy_decide("t", acc(ppl=(0.36, "ppl_increase_pct")), base, "b.json")
    assert o.status == "regressed" and o.failed and o.drop == pytest.approx(0.06)
    assert "REGRESSED" in o.message() and "points" in o.message()
    (o,) = G.accuracy_decide("t", acc(ppl=(0.36, "ppl_increase_pct")), base, "b.json", ppl_tol_pct=0.1)
    assert o.status == "pass"


def test_accuracy_new_invalid_and_uncompared():
    base = {G.ACCURACY_KEY: acc(layer=(40.0, "sqnr_db"))}
    outs = G.accuracy_decide("t", acc(other=(10.0, "sqnr_db"), layer=(0.5, "cosine")), base, "b.json")
    assert [o.status for o in outs] == ["new", "new"]  # absent, or of another kind, in the baseline
    (o,) = G.accuracy_decide("t", {"x": {"value": "high", "kind": "sqnr_db"}}, base, "b.json")
    assert o.status == "invalid" and o.failed
    (o,) = G.accuracy_decide("t", {"x": {"value": 1.0, "kind": "psnr"}}, base, "b.json")
    assert o.status == "invalid"
    (o,) = G.accuracy_decide("t", acc(layer=(1.0, "sqnr_db")), None, None)
    assert o.status == "not-compared" and not o.failed


# --------------------------------------------------------------------------------------------
# The plugin: modes, foreign CPUs, A/B in a real git checkout, accuracy
# --------------------------------------------------------------------------------------------

SYNTH_AB_TEST = textwrap.dedent(
    """
    import os
    from pathlib import Path
    from perf.gate import HIGHER, Rule

    def _value(name, default):
        p = Path(name)  # read from this tree: the old revision's export has its own copy
        return float(p.read_text()) if p.exists() else default

    def _drawn_once():
        p = Path("ratio_once.txt")  # a value only the first process to read it sees (a process-dependent figure)
        if not p.exists():
            return None
        value = float(p.read_text())
        p.unlink()
        return value

    def test_layer(benchmark, perf_gate):
        ratio = _drawn_once() or _value("ratio.txt", 1.0)
        benchmark.pedantic(lambda: None, rounds=3)
        benchmark.extra_info["accuracy"] = {
            "layer_sqnr": {"value": _value("sqnr.txt", 40.0), "kind": "sqnr_db", "int8_per_channel": 35.0},
            "out_cos": {"value": _value("cos.txt", 0.9999), "kind": "cosine"},
        }
        perf_gate.check(benchmark, {"ratio_vs_linear": ratio}, {"ratio_vs_linear": Rule(HIGHER, 0.15)},
                        lambda: {"ratio_vs_linear": ratio})
    """
)

EXTRA_TEST = textwrap.dedent(
    """
    from perf.gate import HIGHER, Rule

    def test_brand_new(benchmark, perf_gate):
        benchmark.pedantic(lambda: None, rounds=3)
        perf_gate.check(benchmark, {"ratio_vs_linear": 9.0}, {"ratio_vs_linear": Rule(HIGHER, 0.15)}, lambda: {"ratio_vs_linear": 9.0})
    """
)


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def synth_git(tmp_path):
    """A git checkout with a synthetic perf suite whose figures come from files in the tree."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytest.ini").write_text("[pytest]\n")
    (repo / "conftest.py").write_text(SYNTH_CONFTEST)
    (repo / "test_synth.py").write_text(SYNTH_AB_TEST)
    (repo / "ratio.txt").write_text("2.0")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "old")

    def run(*args, cwd=repo):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("QINS_PERF_INJECT_SLOWDOWN", None)
        env.update(NO_HYPOTHESIS)
        cmd = [*PYTEST, "--perf-backstop=off", "--perf-clock=cpu", *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    run.repo = repo
    return run


def _save_foreign_baseline(run, cpu=XEON) -> Path:
    """Save a baseline here, then make it look measured on another CPU (as a committed Xeon baseline is)."""
    rc, out = run("--benchmark-save=baseline")
    assert rc == 0, out
    (path,) = saved_files(run.repo)
    data = json.loads(path.read_text())
    assert data["machine_info"]["qins_cpu_key"] == path.parent.parent.name  # stored per CPU
    data["machine_info"]["cpu"] = dict(data["machine_info"]["cpu"], **{k: cpu[k] for k in ("vendor_id_raw", "brand_raw", "family", "model", "flags")})
    data["benchmarks"][0]["extra_info"]["ratio_vs_linear"] = 0.5  # a stored figure that would fail if it were used
    path.write_text(json.dumps(data))
    return path


def test_plugin_stored_mode_is_reported(synth_git):
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "mode: stored baseline for" in out and "gate passed" in out


def test_plugin_foreign_cpu_baseline_never_gates_speed_ab_instead(synth_git):
    path = _save_foreign_baseline(synth_git)
    rev = json.loads(path.read_text())["commit_info"]["id"]
    # unchanged code: the stored 0.5 would fail it; A/B against the same revision passes
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert f"A/B against {rev[:12]} measured here" in out and "Intel(R) Xeon(R) Processor" in out
    assert "--perf-clock=cpu --perf-threads=1)" in out  # the old side measured as this run does
    assert "gate passed (A/B" in out and "REGRESSED" not in out
    # --perf-mode=stored refuses the foreign baseline
    rc, out = synth_git("--benchmark-compare", "--perf-mode=stored")
    assert rc == 4, out
    assert "never used here" in out and "Traceback" not in out
    # a slower new revision (+50%) fails, against the old revision measured here; a new benchmark is not gated
    (synth_git.repo / "ratio.txt").write_text("3.0")
    (synth_git.repo / "test_extra.py").write_text(EXTRA_TEST)
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "GATE FAILED (A/B" in out and "REGRESSED" in out and "test_layer" in out
    assert "confirmed in fresh processes" in out and "new/old per round 3/2, 3/2, 3/2" in out
    assert "test_brand_new" in out and "new in this revision" in out
    # within tolerance (+5%) passes, the new benchmark still not gated
    (synth_git.repo / "ratio.txt").write_text("2.1")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out


def test_ab_regression_seen_only_in_this_runs_process_is_refuted_in_fresh_processes(synth_git):
    """A figure that depends on the process (as the cached forward at 1024x1024 does on an AMD EPYC
    family 23 model 1): this run's process draws 3.0 where every fresh process of either revision
    measures 2.0. The A/B's rounds pair the one draw with the old side and regress it; the
    confirmation measures both revisions in fresh processes and refutes it. Without the
    confirmation the same draw fails the run."""
    path = _save_foreign_baseline(synth_git)
    rev = json.loads(path.read_text())["commit_info"]["id"]
    (synth_git.repo / "ratio_once.txt").write_text("3.0")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert f"test_synth.py::test_layer: regressed in the A/B; confirming in fresh processes of both revisions (3 rounds)" in out
    assert "refuted by its confirmation in fresh processes" in out
    assert f"beyond, then REFUTED in A/B against {rev[:12]} measured here: new/old per round 3/2, 3/2" in out
    assert "new/old per round 2/2, 2/2, 2/2" in out and "GATE FAILED" not in out
    (synth_git.repo / "ratio_once.txt").write_text("3.0")
    rc, out = synth_git("--benchmark-compare", "--perf-ab-confirm=off")
    assert rc == 1, out
    assert "GATE FAILED (A/B" in out and "confirming in fresh processes" not in out


def test_apply_fresh_confirmation_refutes_only_what_its_rounds_pass():
    rule = Rule(HIGHER, 0.15)

    def outcome(test, figure, status="regressed"):
        return G.ABOutcome(test=test, figure=figure, rule=rule, new=[3.0, 3.0], old=[2.0, 2.0], status=status)

    passed, confirmed, unjudged, other, ok = (outcome("t::a", "x"), outcome("t::a", "y"), outcome("t::a", "z"),
                                              outcome("t::b", "x"), outcome("t::a", "w", "pass"))
    verdicts = [G.ABOutcome(test="t::a", figure="x", rule=rule, new=[2.0] * 3, old=[2.0] * 3, status="pass"),
                G.ABOutcome(test="t::a", figure="y", rule=rule, new=[3.0] * 3, old=[2.0] * 3, status="regressed"),
                G.ABOutcome(test="t::a", figure="w", rule=rule, new=[9.0] * 3, old=[2.0] * 3, status="regressed")]
    G.apply_fresh_confirmation([passed, confirmed, unjudged, other, ok], "t::a", verdicts, "a" * 40)
    assert passed.status == "refuted" and not passed.failed and "new/old per round 2/2, 2/2, 2/2" in passed.note
    assert confirmed.failed and confirmed.note.startswith("confirmed in fresh processes: t::a: y REGRESSED")
    assert unjudged.failed and unjudged.note == "confirmed in fresh processes: no verdict"
    assert other.failed and other.note == ""  # another benchmark: not this confirmation's to judge
    assert ok.status == "pass" and ok.note == ""  # a pass is never re-judged
    assert G.ab_table([passed])[1][-1] == "refuted"


def test_speed_targets_are_reported_by_default_and_asserted_only_when_asked():
    assert not G.speed_targets_asserted("report") and G.speed_targets_asserted("on")
    with pytest.raises(ValueError, match="--perf-targets must be one of report, on"):
        G.speed_targets_asserted("auto")


def test_no_per_cpu_exemption_file_is_left():
    assert not (ROOT / "perf" / "targets_missed.json").exists()
    assert not hasattr(G, "known_target_misses")


TARGET_TEST = textwrap.dedent(
    """
    from pathlib import Path

    def test_target(benchmark, perf_gate):
        benchmark.pedantic(lambda: None, rounds=3)
        kernel = Path("kernel.txt").read_text()
        perf_gate.speed_target(benchmark, kernel, "packed b32 (3072, 3072): ratio vs nn.Linear 0.901, target <= 1.1", None)
        perf_gate.speed_target(benchmark, kernel, "packed b1-cold (3072, 3072): ratio vs nn.Linear 4.074, target <= 0.35",
                               "packed b1-cold (3072, 3072): ratio vs nn.Linear 4.074, re-measured 4.105, target <= 0.35")
    """
)


def test_a_missed_speed_target_is_reported_on_every_path_and_fails_only_under_perf_targets_on(synth):
    (synth.path / "test_synth.py").write_text(TARGET_TEST)
    for kernel in ("native-avx2", "native-avx512"):
        (synth.path / "kernel.txt").write_text(kernel)
        rc, out = synth()
        assert rc == 0, out
        assert f"({kernel}): 1 met, 1 missed (reported, not asserted; --perf-targets=on asserts them)" in out
        assert "MISSED test_synth.py::test_target: packed b1-cold (3072, 3072): ratio vs nn.Linear 4.074, re-measured" in out
        assert "MET    test_synth.py::test_target: packed b32 (3072, 3072): ratio vs nn.Linear 0.901" in out
        rc, out = synth("--perf-targets=on")
        assert rc == 1, out
        assert "target <= 0.35" in out and "1 met, 1 missed (asserted: those tests failed)" in out


def test_ab_old_side_gets_this_runs_settings_and_drops_those_it_does_not_define(synth_git):
    from perf import ab

    shutil.copytree(ROOT / "perf", synth_git.repo / "perf", ignore=shutil.ignore_patterns("__pycache__"))
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "perf in tree")
    rev = _git(synth_git.repo, "rev-parse", "HEAD")
    old = ab.OldSide(synth_git.repo, rev, ["test_synth.py"], None, None,
                     ["--perf-clock=wall", "--perf-threads=1", "--perf-no-such-option=3"])
    try:
        assert old.options == ["--perf-clock=wall", "--perf-threads=1"]
        assert old.dropped_options == ["--perf-no-such-option=3"]
        (entry,) = old.run(1).values()
        assert entry["ratio_vs_linear"] == 2.0
        info = json.loads((old.tmp / "round1.json").read_text())["machine_info"]
        assert info["qins_perf_clock"] == "wall" and info["qins_perf_threads"] == 1
    finally:
        old.cleanup()


def test_plugin_unreachable_revision_says_what_to_do(synth_git):
    path = _save_foreign_baseline(synth_git)
    data = json.loads(path.read_text())
    data["commit_info"]["id"] = "f" * 40
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare")
    assert rc == 4, out
    assert "cannot be checked out" in out and "git fetch" in out and G.SAVE_COMMAND in out
    assert "Traceback" not in out
    data["commit_info"] = {}
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare")
    assert rc == 4, out
    assert "records no git revision" in out and "Traceback" not in out


def test_plugin_shallow_clone_says_fetch_depth(synth_git, tmp_path):
    path = _save_foreign_baseline(synth_git)
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    (synth_git.repo / "ratio.txt").write_text("2.0\n")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "later")
    clone = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{synth_git.repo}", str(clone)], check=True)
    rc, out = synth_git("--benchmark-compare", cwd=clone)
    assert rc == 4, out
    assert "shallow clone" in out and "--unshallow" in out and "--depth" in out and "Traceback" not in out
    assert path.name in out


def test_plugin_not_a_git_checkout(synth, tmp_path):
    rc, out = synth("--benchmark-save=baseline", first=1.0)
    assert rc == 0, out
    (path,) = saved_files(synth.path)
    data = json.loads(path.read_text())
    data["machine_info"]["cpu"]["brand_raw"] = "Some Other CPU"
    data["commit_info"] = {"id": "a" * 40}
    path.write_text(json.dumps(data))
    rc, out = synth("--benchmark-compare", first=1.0)
    assert rc == 4, out
    assert "not a git checkout" in out and "Some Other CPU" in out and "Traceback" not in out


def test_plugin_accuracy_gate(synth_git):
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    (synth_git.repo / "sqnr.txt").write_text("39.6")  # -0.4 dB: within 0.5 dB
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "accuracy layer_sqnr (sqnr_db) ok" in out
    (synth_git.repo / "sqnr.txt").write_text("39.3")  # -0.7 dB
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "accuracy layer_sqnr (sqnr_db) REGRESSED" in out and "ACCURACY GATE FAILED" in out and "Traceback" not in out
    rc, out = synth_git("--benchmark-compare", "--perf-sqnr-tol-db=1.0")
    assert rc == 0, out
    (synth_git.repo / "sqnr.txt").write_text("40.0")
    (synth_git.repo / "cos.txt").write_text("0.9997")  # -2e-4
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "accuracy out_cos (cosine) REGRESSED" in out


def test_plugin_accuracy_gated_against_a_foreign_cpu_baseline(synth_git):
    _save_foreign_baseline(synth_git)
    (synth_git.repo / "sqnr.txt").write_text("38.0")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "A/B against" in out and "accuracy layer_sqnr (sqnr_db) REGRESSED" in out


# --------------------------------------------------------------------------------------------
# A/B confirmation of a stored-baseline failure (issue 9)
# --------------------------------------------------------------------------------------------


def _stale_stored_baseline(run, value: float) -> None:
    """Save a baseline on this CPU at HEAD, then overwrite its figure (as a bimodal machine state
    once put a figure far from what the same code measures later)."""
    rc, out = run("--benchmark-save=baseline")
    assert rc == 0, out
    (path,) = saved_files(run.repo)
    data = json.loads(path.read_text())
    data["benchmarks"][0]["extra_info"]["ratio_vs_linear"] = value
    path.write_text(json.dumps(data))


def test_stored_failure_refuted_by_ab_passes_and_says_so(synth_git):
    _stale_stored_baseline(synth_git, 1.0)  # this code measures 2.0: +100% against the stored figure
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "mode: stored baseline for" in out
    assert "beyond the stored baseline twice; A/B against" in out
    assert "REFUTED by A/B" in out and "ok in A/B against" in out and "new/old per round 2/2, 2/2, 2/2" in out
    assert "passed the A/B confirmation" in out and "Traceback" not in out


def test_stored_failure_confirmed_by_ab_fails(synth_git):
    _stale_stored_baseline(synth_git, 1.0)
    (synth_git.repo / "ratio.txt").write_text("3.0")  # this revision (uncommitted) is 1.5x the baseline's
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "ratio_vs_linear REGRESSED: 3, re-measured 3 vs baseline 1 " in out and "REGRESSED in A/B against" in out
    assert "new/old per round 3/2, 3/2, 3/2" in out and "REFUTED" not in out


def test_stored_failure_without_ab_confirmation_fails_at_once(synth_git):
    _stale_stored_baseline(synth_git, 1.0)
    rc, out = synth_git("--benchmark-compare", "--perf-ab-confirm=off")
    assert rc == 1, out
    assert "ratio_vs_linear REGRESSED" in out and "A/B against" not in out


def test_stored_failure_whose_revision_is_unreachable_fails_saying_why(synth_git):
    _stale_stored_baseline(synth_git, 1.0)
    (path,) = saved_files(synth_git.repo)
    data = json.loads(path.read_text())
    data["commit_info"]["id"] = "e" * 40
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "not confirmed by A/B" in out and "cannot be checked out here" in out and "Traceback" not in out


def test_apply_ab_confirmation_keeps_failures_the_ab_cannot_judge():
    def failed(fig):
        return G.Outcome(test="t::a", figure=fig, value=2.0, rule=Rule(HIGHER, 0.15), baseline=1.0, status="regressed")

    ok, bad, new, absent = failed("x"), failed("y"), failed("z"), failed("w")
    verdicts = [
        G.ABOutcome(test="t::a", figure="x", rule=Rule(HIGHER, 0.15), new=[2.0, 2.0], old=[2.0, 2.0], status="pass"),
        G.ABOutcome(test="t::a", figure="y", rule=Rule(HIGHER, 0.15), new=[2.0, 2.0], old=[1.0, 1.0], status="regressed"),
        G.ABOutcome(test="t::a", figure="z", rule=Rule(HIGHER, 0.15), new=[], old=[], status="new", note="no benchmark"),
    ]
    still = G.apply_ab_confirmation([ok, bad, new, absent], verdicts, "a" * 40)
    assert still == [bad, new, absent]
    assert ok.status == "refuted" and not ok.failed and "ok in A/B against aaaaaaaaaaaa" in ok.note
    assert bad.failed and "REGRESSED in A/B" in bad.note and new.failed and "not gated" in new.note
    assert absent.failed and absent.note == "not confirmable by A/B against aaaaaaaaaaaa: no verdict"


def test_after_one_confirmed_regression_later_failures_spend_no_more_ab(synth_git):
    (synth_git.repo / "test_synth2.py").write_text(SYNTH_AB_TEST)  # a second benchmark, same figure file
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two benchmarks")
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    (path,) = saved_files(synth_git.repo)
    data = json.loads(path.read_text())
    for bench in data["benchmarks"]:
        bench["extra_info"]["ratio_vs_linear"] = 1.0
    path.write_text(json.dumps(data))
    (synth_git.repo / "ratio.txt").write_text("3.0")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert out.count("beyond the stored baseline twice; A/B against") == 1
    assert "REGRESSED in A/B against" in out
    assert "not confirmed by A/B: a regression is already confirmed by A/B in this run" in out


def test_ab_confirmations_stop_at_the_session_budget():
    from types import SimpleNamespace

    from perf import plugin

    state = SimpleNamespace(baseline=G.Baseline(path=Path("b.json"), entries={}, commit_info={"id": "c" * 40}),
                            confirm_error="", confirm_regressed=False, confirm_count=plugin.MAX_AB_CONFIRMATIONS)
    failed = [G.Outcome(test="t::a", figure="x", value=2.0, rule=Rule(HIGHER, 0.15), baseline=1.0, status="regressed")]
    still = plugin._confirm_by_ab(state, SimpleNamespace(config=None), None, failed)
    assert still == failed and still[0].failed
    assert still[0].note == f"not confirmed by A/B: {plugin.MAX_AB_CONFIRMATIONS} A/B confirmations already spent in this run"
    assert state.confirm_count == plugin.MAX_AB_CONFIRMATIONS


SLOW_TEST = textwrap.dedent(
    """
    import time
    from pathlib import Path

    def test_slow(benchmark):
        pause = float(Path("sleep.txt").read_text())  # from this tree: the old revision's export has its own
        benchmark.pedantic(lambda: time.sleep(pause), rounds=3)
    """
)


def _baseline_that_trips_the_backstop(run) -> tuple[Path, dict]:
    """Commit a sleeping benchmark (``SLOW_TEST``, 1 ms), save a wall-clock baseline, and return
    its file and its data with that benchmark's stored time 100x faster than it runs (unwritten)."""
    repo = run.repo
    (repo / "test_slow.py").write_text(SLOW_TEST)
    (repo / "sleep.txt").write_text("0.001")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "slow test")
    rc, out = run("--benchmark-save=baseline", "--perf-clock=wall")
    assert rc == 0, out
    (path,) = saved_files(repo)
    data = json.loads(path.read_text())
    (slow,) = [b for b in data["benchmarks"] if b["name"] == "test_slow"]
    slow["stats"]["min"] /= 100  # the stored time looks 100x faster than this machine now runs it
    return path, data


@pytest.mark.slow
def test_plugin_backstop_failure_is_confirmed_or_refuted_by_a_same_work_ab(synth_git):
    """The absolute backstop (min:900%, wall clock: sleeping takes no CPU time) trips in both runs;
    the A/B of the benchmark's time against the baseline's revision decides: unchanged code passes,
    a 30x slower tree fails."""
    repo = synth_git.repo
    path, data = _baseline_that_trips_the_backstop(synth_git)
    path.write_text(json.dumps(data))
    rev = data["commit_info"]["id"][:12]

    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%")
    assert rc == 0, out
    assert "Performance has regressed" in out  # pytest-benchmark still says which benchmark and by how much
    assert "tripped against" in out and "A/B refuted it" in out
    assert f"test_slow.py::test_slow: refuted by A/B against {rev} measured here" in out and "Traceback" not in out

    (repo / "sleep.txt").write_text("0.03")  # this tree only: the baseline's revision still sleeps 1 ms
    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%")
    assert rc == 1, out
    assert "GATE FAILED: absolute backstop" in out
    assert f"test_slow.py::test_slow: CONFIRMED by A/B against {rev} measured here" in out and "Traceback" not in out

    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%", "--perf-ab-confirm=off")
    assert rc == 1, out
    assert "GATE FAILED: absolute backstop" in out and "not confirmed by A/B: --perf-ab-confirm=off" in out


@pytest.mark.slow
def test_backstop_confirmation_after_a_figure_confirmation_in_one_run_reuses_the_export(synth_git):
    """A figure beyond its stored baseline (A/B-refuted during its test) and a tripped backstop
    (A/B-refuted at the end) in one run: both confirmations use one export of the baseline's
    revision, which must outlive the first (a campaign run once crashed here with FileNotFoundError,
    the export removed at session finish before the backstop's confirmation ran)."""
    path, data = _baseline_that_trips_the_backstop(synth_git)
    (layer,) = [b for b in data["benchmarks"] if b["name"] == "test_layer"]
    layer["extra_info"]["ratio_vs_linear"] = 1.0  # this code measures 2.0: +100%, refuted by A/B
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare", "--perf-clock=wall", "--perf-backstop=min:900%")
    assert rc == 0, out
    assert "REFUTED by A/B" in out and "A/B refuted it" in out
    assert "test_slow.py::test_slow: refuted by A/B against" in out
    assert "Traceback" not in out and "FileNotFoundError" not in out
