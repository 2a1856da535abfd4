"""End to end: a Phi-3 whose weights exceed the cache, generating 128 tokens.

Phi-3 from a config (hidden 1024, 8 layers, vocab 8192, seeded random weights; ``lm_head`` stays
fp32), greedy, 32-token prompt, 128 new tokens, batch 1, 1 torch thread. FP32 against QINS
memory-saving packed (1 B/weight) and split (2 B/weight), **each model in a fresh process**
(``python -m perf.memprobe ... large``): tokens per CPU second of the timed generation (after a
4-token warm-up), the decoder's linear-layer bytes (``qins.model_memory``) and the process's peak
resident memory while generating, above its start.

Figures (ratios against FP32 from the same probe run): ``tokens_per_s_vs_fp32``,
``linear_bytes_vs_fp32``, ``peak_generate_vs_fp32``. Gated against the baseline (tokens/s ratio with
--perf-e2e-tol, memory ratios with --perf-memory-tol) and against the absolute targets: tokens/s and
linear bytes and peak memory asserted (a miss is measured once more before it fails); the tokens/s
target, a speed target, is stated met or missed in the summary and asserted only under
``--perf-targets=on`` (``perf.targets.speed_targets_asserted``).
"""
from __future__ import annotations

import pytest

import qins.kernels
from perf.e2e import E2EBench, skip_unless_proc

NEW_TOKENS = 128
MODES = ["fp32", "qins-packed-memsave", "qins-split-memsave"]
BENCH = E2EBench(
    model="large",
    modes=tuple(MODES),
    new_tokens=NEW_TOKENS,
    figures=("tokens_per_s", "fp32_tokens_per_s", "tokens_per_s_vs_fp32", "linear_bytes", "linear_bytes_vs_fp32",
             "peak_generate_delta", "fp32_peak_generate_delta", "peak_generate_vs_fp32", "model_bytes"),
    bytes_figure="linear_bytes_vs_fp32",
)
#: the targets for the packed memory-saving model, against FP32 (asserted). The peak counts
#: what the process allocates while generating: each probe child maps its shared libraries before
#: it measures (perf/memprobe.py), so the page cache no longer moves it (it put this ratio at 0.51
#: in fresh venvs and 0.44 in old ones before).
TARGETS = {
    "tokens_per_s_vs_fp32": (">=", 1.5),
    "linear_bytes_vs_fp32": ("<=", 0.27),
    "peak_generate_vs_fp32": ("<=", 0.5),
}
#: the speed target among them: reported met or missed, asserted under --perf-targets=on; the memory
#: targets hold on every path and are always asserted
SPEED_TARGETS = frozenset({"tokens_per_s_vs_fp32"})


@pytest.fixture(scope="module")
def probes(perf_state):
    skip_unless_proc()
    return BENCH.probe(perf_state.settings.threads)


@pytest.mark.parametrize("mode", MODES[1:])
def test_generate_large_model(benchmark, perf_gate, perf_state, probes, mode):
    benchmark.group = "e2e Phi-3 1024x8, 128 tokens"
    figures, remeasure = BENCH.gate(benchmark, perf_gate, perf_state.settings.threads, probes, mode)
    if mode != "qins-packed-memsave":
        return
    benchmark.extra_info["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    missed = _missed(figures)
    if missed:
        figures = remeasure()
        benchmark.extra_info["target_recheck"] = {k: figures[k] for k in TARGETS}
        missed = _missed(figures)
    memory = {k: v for k, v in missed.items() if k not in SPEED_TARGETS}
    assert not memory, f"memory targets missed (after a re-measurement): {memory}"
    speed = {k: v for k, v in missed.items() if k in SPEED_TARGETS}
    kernel = qins.kernels.backend_name("cpu")  # what the probes' memory-saving layers ran
    perf_gate.speed_target(benchmark, kernel, f"tokens/s vs FP32 {figures['tokens_per_s_vs_fp32']:.3f}, target "
                           f"{' '.join(map(str, TARGETS['tokens_per_s_vs_fp32']))}",
                           f"speed target missed (after a re-measurement): {speed}" if speed else None)


def _missed(figures: dict) -> dict:
    return {k: figures[k] for k, (op, v) in TARGETS.items() if not (figures[k] >= v if op == ">=" else figures[k] <= v)}
