"""What the end-to-end benchmarks share (perf/test_e2e.py, perf/test_e2e_real.py).

Each runs FP32 and QINS modes of one model in fresh processes (:func:`perf.test_memory.run_probe`),
turns each QINS mode's probe into figures against FP32's from the same run (:func:`vs_fp32`) and
gates the tokens/s, bytes and peak-memory ratios against the baseline with one re-measurement
(:meth:`E2EBench.gate`). What each module adds (its targets) stays in the module.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest

from perf.gate import HIGHER, LOWER, Rule
from perf.test_memory import run_probe

#: model_memory counts bytes exactly; only a real change in what is stored moves a bytes ratio
BYTES_TOL = 0.01


def _peak(probe: Mapping) -> int:
    """Peak resident bytes while generating, above the probe process's start (bytes)."""
    return probe["peak_generate"] - probe["rss_start"]


#: every figure :func:`vs_fp32` can give, from (the mode's probe, FP32's probe): tokens per CPU
#: second (tokens/s), bytes (``model_bytes`` whole model, ``linear_bytes`` the decoder's Linears),
#: peak resident bytes while generating above the start (``peak_generate_delta``), and their ratios
#: to FP32's (dimensionless)
FIGURES: dict[str, Callable[[Mapping, Mapping], float]] = {
    "tokens_per_s": lambda r, fp32: r["tokens_per_s"],
    "fp32_tokens_per_s": lambda r, fp32: fp32["tokens_per_s"],
    "tokens_per_s_vs_fp32": lambda r, fp32: r["tokens_per_s"] / fp32["tokens_per_s"],
    "model_bytes": lambda r, fp32: r["model_memory"]["total"],
    "fp32_model_bytes": lambda r, fp32: fp32["model_memory"]["total"],
    "model_bytes_vs_fp32": lambda r, fp32: r["model_memory"]["total"] / fp32["model_memory"]["total"],
    "linear_bytes": lambda r, fp32: r["linear_bytes"],
    "linear_bytes_vs_fp32": lambda r, fp32: r["linear_bytes"] / fp32["linear_bytes"],
    "peak_generate_delta": lambda r, fp32: _peak(r),
    "fp32_peak_generate_delta": lambda r, fp32: _peak(fp32),
    "peak_generate_vs_fp32": lambda r, fp32: _peak(r) / _peak(fp32),
}


def vs_fp32(probes: Mapping[str, Mapping], mode: str, keys: Sequence[str]) -> dict[str, float]:
    """The figures named in ``keys`` (of :data:`FIGURES`, in that order) of ``probes[mode]``
    against ``probes["fp32"]``, both from one :func:`run_probe` run (mode -> its probe's dict)."""
    r, fp32 = probes[mode], probes["fp32"]
    return {k: FIGURES[k](r, fp32) for k in keys}


def skip_unless_proc() -> None:
    """Skip the test: the probes' process memory figures read /proc (Linux only)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("process memory figures read /proc (Linux only)")


@dataclass(frozen=True)
class E2EBench:
    """One end-to-end benchmark: ``model`` (perf/memprobe.py's model name, also the gate key's
    ``e2e-<model>/<mode>``) generating ``new_tokens`` tokens in each of ``modes`` (``"fp32"`` first),
    recording ``figures`` (keys of :data:`FIGURES`) and gating ``tokens_per_s_vs_fp32``,
    ``bytes_figure`` (a bytes ratio, tolerance :data:`BYTES_TOL`) and ``peak_generate_vs_fp32``."""

    model: str
    modes: tuple[str, ...]
    new_tokens: int
    figures: tuple[str, ...]
    bytes_figure: str

    def probe(self, threads: int) -> dict:
        """Every mode in a fresh process at ``threads`` torch threads: mode -> its probe's dict."""
        return run_probe(self.modes, threads, self.new_tokens, self.model)

    def figures_of(self, probes: Mapping[str, Mapping], mode: str) -> dict[str, float]:
        """This benchmark's figures of ``mode`` against FP32 from the same ``probes``."""
        return vs_fp32(probes, mode, self.figures)

    def rules(self, tol: Mapping[str, float]) -> dict[str, Rule]:
        """The gated figures: tokens/s ratio (``tol["e2e"]``), bytes ratio, peak ratio (``tol["memory"]``)."""
        return {
            "tokens_per_s_vs_fp32": Rule(LOWER, tol["e2e"]),
            self.bytes_figure: Rule(HIGHER, BYTES_TOL),
            "peak_generate_vs_fp32": Rule(HIGHER, tol["memory"]),
        }

    def gate(self, benchmark, perf_gate, threads: int, probes: Mapping[str, Mapping],
             mode: str) -> tuple[dict[str, float], Callable[[], dict[str, float]]]:
        """Record and gate ``mode``'s figures from ``probes`` (a regression is measured once more,
        in fresh processes at ``threads`` threads, before it fails). Returns the figures and that
        re-measurement, for the module's targets."""
        figures = self.figures_of(probes, mode)
        benchmark.pedantic(lambda: None, rounds=1)  # the figures come from the fresh processes

        def remeasure() -> dict[str, float]:
            return self.figures_of(self.probe(threads), mode)

        perf_gate.check(benchmark, figures, self.rules(perf_gate.tol), remeasure, key=f"e2e-{self.model}/{mode}")
        return figures, remeasure
