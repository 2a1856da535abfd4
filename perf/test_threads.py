"""Thread scaling: the memory-saving layer and model against fp32 at one thread and at every core.

* **Layer** (``test_memory_saving_layer_thread_scaling``): packed 3072x8192 (the Llama-style
  up-projection shape of perf/test_kernels.py), batch 1 (one layer called repeatedly) and batch 32,
  against ``nn.Linear``; figure ``ratio_vs_linear``.
* **Generation** (``test_generation_thread_scaling``): perf/test_e2e.py's Phi-3 (hidden 1024, 8
  layers, vocab 8192, seeded; ``lm_head`` fp32) generating 16 greedy tokens with the KV cache after a
  32-token prompt, memory-saving packed (the library default) against the FP32 model, both in this
  process; figure ``ratio_vs_fp32`` (QINS's generation time over FP32's, the inverse of the tokens/s
  ratio).

Each at ``torch.set_num_threads(1)`` and at every core of this process's affinity. Each QINS call is
interleaved with fp32's at the same thread count, on the **wall clock** (CPU time adds the threads'
times up, so it cannot show a speed-up), and the figure is the median of the paired ratios: QINS's
time over fp32's at that thread count (lower is faster).

Gated against the baseline with ``--perf-ratio-tol`` (batch 32, GEMM-bound like fp32) or
``--perf-codec-tol`` (batch 1 and generation: a stream of codes against fp32's stream of floats). The
target, per case: the all-core ratio is no worse than the one-thread ratio (QINS gains at least as
much from the extra cores as fp32 does), judged in the all-core test against the one-thread test of
the same run, a miss re-measured once; a speed target, stated met or missed, asserted only under
``--perf-targets=on``. On a one-core machine the all-core cases are skipped.
"""
from __future__ import annotations

import copy

import pytest
import torch

from perf import timing
from perf.gate import HIGHER, Rule
from perf.memprobe import build, convert
from perf.timing import WARMUP_S, paired_again, plan, slow_down_modules, slowed, synced
from qins.testing.cores import usable_cores

SHAPE = (3072, 8192)
BATCHES = {"b1": 1, "b32": 32}
#: seconds of pairs per measurement (x --perf-budget). Long, because on a shared machine the figure
#: moves with the neighbours in phases of seconds (the second core taken, the L3 or the memory bus
#: shared), and each side reacts differently: the QINS codes (25 MB) stay in L3, fp32's 100 MB
#: stream from memory. On AMD EPYC 25/1 (Zen 3, 2 cores), b32 at every core, unchanged code, one
#: process: 1.5 s windows gave 0.60-0.84 (12 windows), 10 s windows 0.71-0.83 (4); docs/perf.md.
BUDGET_S = 10.0
#: generation: new tokens per call, and seconds of pairs per measurement (x --perf-budget). A pair is
#: ~1.5 s at one thread (AMD EPYC 25/1), and single pairs' ratios spread 0.8-1.3 there, so the
#: median needs ~10 pairs
GENERATE_TOKENS = 16
GENERATE_BUDGET_S = 20.0
#: the target's slack: the all-core ratio may exceed the one-thread ratio by this factor (timer noise
#: between two like measurements of the same run, not a performance allowance)
TARGET_SLACK = 1.05


THREADS = {"1thread": 1, "allcores": usable_cores()}


@pytest.fixture(autouse=True)
def _wall_clock_inference():
    clock, threads = timing.clock, torch.get_num_threads()
    timing.use_clock("wall")  # restored below: the rest of the suite keeps its clock
    try:
        with torch.inference_mode():
            yield
    finally:
        timing.clock = clock
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layers(device):
    from qins import ProjectiveLinear, QinsConfig

    o, n = SHAPE
    torch.manual_seed(2001)  # perf/test_kernels.py's seed for this shape
    lin = torch.nn.Linear(n, o, bias=False).to(device).eval()
    return lin, ProjectiveLinear.from_linear(lin, QinsConfig(), cache_weight=False).eval()


#: case name -> the figure measured at one thread in this run, for the target
_ONE_THREAD: dict[str, float] = {}


def _scaling(benchmark, perf_gate, *, case: str, threads: str, target, reference, figure: str, tol: float,
             budget_s: float, match: bool, extra: dict, reference_name: str, key: str, what: str,
             kernel: str) -> None:
    """Time ``target`` against ``reference`` (interleaved pairs, wall clock) at this thread count,
    record and gate ``figure`` (their median ratio; ``reference_name``: the figure of the reference's
    median seconds), and judge the all-core target against the one-thread ratio of ``case`` from the
    same run. Sets torch's thread count; skips the all-core case on one core."""
    count = THREADS[threads]
    if threads == "allcores" and count == 1:
        pytest.skip("one core: nothing to scale to")
    torch.set_num_threads(count)
    if benchmark.disabled:
        benchmark.pedantic(target, rounds=1)
        return
    # Both sides timed here on the wall clock (pytest-benchmark's timer is the suite's CPU clock).
    repeat, pairs = plan(target, reference, match=match, budget_s=budget_s * perf_gate.budget, min_pairs=5,
                         max_pairs=4000, warmup=1, warmup_s=WARMUP_S)
    p = paired_again(target, reference, repeat=repeat, pairs=pairs)
    benchmark.pedantic(lambda: None, rounds=1)  # the figures come from the paired measurement above
    figures = {**extra, "threads": count, "clock": "wall", "time_s": p.target_median,
               reference_name: p.reference_median, figure: p.ratio, "pairs": len(p.target)}

    def remeasure():
        return {figure: paired_again(target, reference, repeat=p.repeat, pairs=len(p.target)).ratio}

    perf_gate.check(benchmark, figures, {figure: Rule(HIGHER, tol)}, remeasure, key=key)
    if threads == "1thread":
        _ONE_THREAD[case] = p.ratio
        return
    one = _ONE_THREAD.get(case)
    if one is None:  # the one-thread case did not run (deselected): nothing to compare with
        return
    ratio, missed = p.ratio, None
    if ratio > one * TARGET_SLACK:
        ratio = remeasure()[figure]
        benchmark.extra_info["target_recheck"] = ratio
        if ratio > one * TARGET_SLACK:
            missed = (f"{what} at {count} threads: {figure} {p.ratio:.3f}, re-measured {ratio:.3f}, above the "
                      f"one-thread ratio {one:.3f}")
    perf_gate.speed_target(benchmark, kernel, f"{what}: {figure} at {count} threads {ratio:.3f}, target <= the "
                           f"one-thread ratio {one:.3f}", missed)


def _kernel(module) -> str:
    """The kernel a ProjectiveLinear runs (its ``extra_repr``'s last field)."""
    return module.extra_repr().rsplit("kernel=", 1)[-1]


@pytest.mark.parametrize("threads", list(THREADS))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_memory_saving_layer_thread_scaling(benchmark, perf_gate, device, layers, inject_factor, batch, threads):
    o, n = SHAPE
    benchmark.group = f"threads {o}x{n} packed {batch}"
    lin, q = layers
    g = torch.Generator().manual_seed(o + n + BATCHES[batch])
    x = torch.randn(BATCHES[batch], n, generator=g).to(device)
    _scaling(benchmark, perf_gate, case=batch, threads=threads,
             target=synced(slowed(lambda: q(x), inject_factor, device), device),
             reference=synced(lambda: lin(x), device), figure="ratio_vs_linear",
             tol=perf_gate.tol["codec"] if BATCHES[batch] == 1 else perf_gate.tol["ratio"], budget_s=BUDGET_S,
             match=True, extra={}, reference_name="linear_time_s", key=f"threads/packed/{o}x{n}/{batch}/{threads}",
             what=f"packed {o}x{n} {batch}", kernel=_kernel(q))


@pytest.fixture(scope="module")
def models(device, inject_factor):
    """(FP32 Phi-3, its memory-saving packed copy, the prompt ids): perf/test_e2e.py's model, prompt and
    conversion (perf/memprobe.py's ``build`` and ``convert``), in this process. An injected slowdown slows
    every ProjectiveLinear forward."""
    from qins import ProjectiveLinear

    fp32, ids = build("large")
    fp32 = fp32.to(device).eval()
    q = copy.deepcopy(fp32)
    convert(q, "qins-packed-memsave")
    slow_down_modules(q, ProjectiveLinear, inject_factor)
    return fp32, q.eval(), ids.to(device)


def _generate(model, ids, device):
    mask = torch.ones_like(ids)

    def run():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS,
                             do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[-1] == ids.shape[-1] + GENERATE_TOKENS, out.shape

    return synced(run, device)


@pytest.mark.parametrize("threads", list(THREADS))
def test_generation_thread_scaling(benchmark, perf_gate, device, models, threads):
    from qins import ProjectiveLinear

    fp32, q, ids = models
    benchmark.group = "threads e2e Phi-3 1024x8 packed memory-saving"
    _scaling(benchmark, perf_gate, case="generate", threads=threads, target=_generate(q, ids, device),
             reference=_generate(fp32, ids, device), figure="ratio_vs_fp32", tol=perf_gate.tol["codec"],
             budget_s=GENERATE_BUDGET_S, match=False, extra={"new_tokens": GENERATE_TOKENS},
             reference_name="fp32_time_s", key=f"threads/e2e-large/qins-packed-memsave/{threads}",
             what="e2e Phi-3 1024x8 packed memory-saving generation",
             kernel=_kernel(next(m for m in q.modules() if isinstance(m, ProjectiveLinear))))
