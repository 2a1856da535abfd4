"""Memory benchmarks: FP32 vs QINS cached vs QINS memory-saving, for the end-to-end tiny Phi-3.

Two kinds of figures, stored in ``extra_info`` and gated against the baseline like the times:

* ``model_bytes``: :func:`qins.model_memory` total (parameters + buffers + decoded caches, every
  storage counted once). Deterministic, so its tolerance is tight.
* process figures from a fresh process per mode (perf/memprobe.py): resident bytes added by the
  loaded model (``loaded_rss_delta``), and the peak resident bytes above the process's start while
  building+converting (``peak_load_delta``) and while generating (``peak_generate_delta``). These
  absolute deltas vary with the venv (see :func:`ratios_from`), so QINS modes are gated on their
  ratio to FP32's from the same probe run (``peak_generate_vs_fp32``, ``peak_load_vs_fp32``).

The benchmark timing itself is ``model_memory(model)`` (cheap; the accounting walk).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf.gate import HIGHER, Rule
from perf.models import MODES
from perf.timing import plain_benchmark

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
#: model_memory counts bytes exactly; only a real change in what is stored moves it
MODEL_BYTES_TOL = 0.01


def run_probe(modes, threads: int, new_tokens: int = 32, model: str = "tiny") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-m", "perf.memprobe", ",".join(modes), str(new_tokens), str(threads), model],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            results[r["mode"]] = r
    if proc.returncode or set(results) != set(modes):
        tail = (proc.stderr or "")[-2000:]
        pytest.fail(f"memory probe failed (exit {proc.returncode}): {results}\n{tail}", pytrace=False)
    return results


def figures_from(r: dict) -> dict:
    mm = r["model_memory"]
    return {
        "model_bytes": mm["total"],
        "model_mib": mm["total"] / MIB,
        "parameter_bytes": mm["parameters"],
        "buffer_bytes": mm["buffers"],
        "cache_bytes": mm["caches"],
        "rss_start_bytes": r["rss_start"],
        "loaded_rss_delta": r["rss_loaded"] - r["rss_start"],
        "peak_load_delta": r["peak_load"] - r["rss_start"],
        "peak_generate_delta": r["peak_generate"] - r["rss_start"],
        "peak_generate_delta_mib": (r["peak_generate"] - r["rss_start"]) / MIB,
        "peak_rss_bytes": max(r["peak_load"], r["peak_generate"]),
        "peak_rss_mib": max(r["peak_load"], r["peak_generate"]) / MIB,
        "peak_reset_supported": r["peak_reset"],
    }


@pytest.fixture(scope="module")
def probes(perf_state):
    if not sys.platform.startswith("linux"):
        pytest.skip("process memory figures read /proc (Linux only)")
    return run_probe(MODES, perf_state.settings.threads)


def ratios_from(r: dict, fp32: dict) -> dict:
    """Peak figures as ratios to FP32's from the same probe run (like work, same process state).

    The absolute resident-memory deltas depend on the venv the probe runs in (with identical code
    and packages, FP32's peak_generate_delta was 103, 138 and 157 MB in three venvs on the same
    machine), so they are recorded but gated only as ratios to FP32 measured in the same run.
    """
    a, b = figures_from(r), figures_from(fp32)
    return {
        "peak_generate_vs_fp32": a["peak_generate_delta"] / b["peak_generate_delta"],
        "peak_load_vs_fp32": a["peak_load_delta"] / b["peak_load_delta"],
    }


@pytest.mark.parametrize("mode", MODES)
def test_memory(benchmark, perf_gate, perf_state, e2e_models, probes, mode):
    from qins import model_memory

    benchmark.group = "memory (tiny Phi-3, 32k vocab)"
    model = e2e_models[mode]
    times = plain_benchmark(benchmark, lambda: model_memory(model), budget_s=0.2, max_rounds=50)
    figures = figures_from(probes[mode])
    in_process = model_memory(model).total
    assert in_process == figures["model_bytes"], (in_process, figures["model_bytes"])
    if times is None:
        return
    rules = {"model_bytes": Rule(HIGHER, MODEL_BYTES_TOL)}
    if mode != "fp32":
        figures.update(ratios_from(probes[mode], probes["fp32"]))
        rules["peak_generate_vs_fp32"] = Rule(HIGHER, perf_gate.tol["memory"])
        rules["peak_load_vs_fp32"] = Rule(HIGHER, perf_gate.tol["memory"])

    def remeasure():
        again = run_probe(["fp32", mode] if mode != "fp32" else [mode], perf_state.settings.threads)
        out = figures_from(again[mode])
        if mode != "fp32":
            out.update(ratios_from(again[mode], again["fp32"]))
        return out

    perf_gate.check(benchmark, figures, rules, remeasure, key=f"memory/{mode}")
