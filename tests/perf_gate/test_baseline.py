"""Baseline files (perf/baseline.py): located as pytest-benchmark picks them, validated, and every
unusable one reported with how to create one."""
from __future__ import annotations

import json

import pytest

from perf import gate as G
from perf.baseline import (
    BaselineError,
    load_baseline,
    locate_baseline,
)
from tests.perf_gate.support import (
    MACHINE,
    saved_run,
    write,
)

# --------------------------------------------------------------------------------------------
# Baseline files
# --------------------------------------------------------------------------------------------


def test_locate_latest_and_load(tmp_path):
    store = tmp_path / ".benchmarks"
    write(store / MACHINE / "0001_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 2.0}}))
    newest = write(store / MACHINE / "0002_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 3.0}}))
    path = locate_baseline(store, MACHINE, True)
    assert path == newest
    b = load_baseline(path)
    assert b.entry("a::t")["ratio_vs_linear"] == 3.0
    assert b.entry("a::unknown") == {}
    assert locate_baseline(store, MACHINE, "0001").name == "0001_baseline.json"
    assert locate_baseline(store, MACHINE, str(newest)) == newest


def test_missing_baseline_says_how_to_create_one(tmp_path):
    with pytest.raises(BaselineError) as e:
        locate_baseline(tmp_path / ".benchmarks", MACHINE, True)
    msg = str(e.value)
    assert "no baseline" in msg and MACHINE in msg and G.SAVE_COMMAND in msg


def test_baseline_of_another_machine_is_named(tmp_path):
    store = tmp_path / ".benchmarks"
    write(store / "Linux-CPython-3.12-64bit" / "0001_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 2.0}}))
    with pytest.raises(BaselineError) as e:
        locate_baseline(store, MACHINE, True)
    assert "Linux-CPython-3.12-64bit" in str(e.value) and G.SAVE_COMMAND in str(e.value)


def test_unmatched_run_number(tmp_path):
    store = tmp_path / ".benchmarks"
    write(store / MACHINE / "0001_baseline.json", saved_run({"a::t": {"ratio_vs_linear": 2.0}}))
    with pytest.raises(BaselineError, match="0007"):
        locate_baseline(store, MACHINE, "0007")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        (json.dumps({"benchmarks": "nope"}), "no 'benchmarks' list"),
        (json.dumps({"benchmarks": []}), "empty"),
        (json.dumps({"benchmarks": [{"fullname": "a", "stats": {}}]}), "stats.min"),
        (
            json.dumps({"benchmarks": [{"fullname": "a", "stats": {"min": 1}, "extra_info": {G.GATE_KEY: 3}}]}),
            "malformed",
        ),
    ],
)
def test_corrupt_baseline_is_reported_clearly(tmp_path, content, expected):
    path = write(tmp_path / ".benchmarks" / MACHINE / "0001_baseline.json", content)
    with pytest.raises(BaselineError) as e:
        load_baseline(path)
    msg = str(e.value)
    assert expected in msg and "corrupt" in msg and G.SAVE_COMMAND in msg and "0001_baseline.json" in msg


def test_baseline_without_gate_figures_is_rejected(tmp_path):
    data = saved_run({"a::t": {"something": 1.0}})
    path = write(tmp_path / "s" / MACHINE / "0001_x.json", data)
    with pytest.raises(BaselineError, match="no gated QINS figures"):
        load_baseline(path)


def test_baseline_measured_with_injected_slowdown_is_rejected(tmp_path):
    data = saved_run({"a::t": {"ratio_vs_linear": 1.0, "inject_slowdown": 1.5}})
    path = write(tmp_path / "s" / MACHINE / "0001_x.json", data)
    with pytest.raises(BaselineError, match="injected slowdown"):
        load_baseline(path)
