"""Shared by the perf gate's tests (``tests/perf_gate/``): synthetic saved runs, CPUs, A/B figures,
and the synthetic perf suites that ``conftest.py``'s ``synth`` / ``synth_git`` fixtures run under the
real plugin in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from perf import gate as G
from perf.gate import HIGHER, Rule

ROOT = Path(__file__).resolve().parents[2]  # the checkout (tests/perf_gate/support.py)
#: how the synthetic suites below are run: in a subprocess, ...
PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q")
#: ... and so are the A/B's runs they start (inherited): without Hypothesis' pytest plugin. They use
#: no Hypothesis; importing it cost each run ~1.3 s of its ~2.9 s (AMD EPYC family 23 model 1).
NO_HYPOTHESIS = {"PYTEST_ADDOPTS": "-p no:hypothesispytest"}
MACHINE = "Linux-CPython-3.11-64bit"


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
    data = {
        "machine_info": {"node": "x"},
        "commit_info": {},
        "benchmarks": benches,
        "datetime": "2026-01-01T00:00:00",
        "version": "5.3.1",
    }
    data.update(extra)
    return data


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


SYNTH_CONFTEST = textwrap.dedent(
    """
    from perf.fixtures import perf_gate, perf_state  # the same hooks and fixtures perf/conftest.py installs
    from perf.plugin import (
        pytest_addoption, pytest_benchmark_update_json,
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


def saved_files(tmp_path: Path) -> list:
    return sorted((tmp_path / ".benchmarks").rglob("*.json"))


XEON = {
    "vendor_id_raw": "GenuineIntel",
    "brand_raw": "Intel(R) Xeon(R) Processor",
    "family": 6,
    "model": 207,
    "stepping": 2,
    "hz_actual_friendly": "2.1000 GHz",
    "flags": ["avx2", "avx512f", "avx512_vnni", "avx512vbmi", "amx_tile", "sse2"],
}
EPYC = {"vendor_id_raw": "AuthenticAMD", "brand_raw": "AMD EPYC", "family": 26, "model": 2, "stepping": 1,
        "flags": ["avx2", "avx512f", "avx512vbmi", "avx512_bf16", "sse2"]}

#: the rule of :func:`ab_info`'s figures unless another is given
AB_RULE = Rule(HIGHER, 0.15)


def ab_info(value, figure="ratio_vs_linear", rule=AB_RULE):
    return {figure: value, G.GATE_KEY: [figure], G.RULES_KEY: {figure: G.rule_to_json(rule)}}


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
        perf_gate.check(benchmark, {"ratio_vs_linear": 9.0}, {"ratio_vs_linear": Rule(HIGHER, 0.15)},
                        lambda: {"ratio_vs_linear": 9.0})
    """
)


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _save_foreign_baseline(run, cpu=XEON) -> Path:
    """Save a baseline here, then make it look measured on another CPU (as a committed Xeon baseline is)."""
    rc, out = run("--benchmark-save=baseline")
    assert rc == 0, out
    (path,) = saved_files(run.repo)
    data = json.loads(path.read_text())
    assert data["machine_info"]["qins_cpu_key"] == path.parent.parent.name  # stored per CPU
    data["machine_info"]["cpu"] = dict(
        data["machine_info"]["cpu"], **{k: cpu[k] for k in ("vendor_id_raw", "brand_raw", "family", "model", "flags")}
    )
    data["benchmarks"][0]["extra_info"]["ratio_vs_linear"] = 0.5  # a stored figure that would fail if it were used
    path.write_text(json.dumps(data))
    return path
