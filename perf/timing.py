"""Timing helpers: device sync, interleaved (paired) measurement, and the injected slowdown.

Paired measurement runs the reference and the target alternately, ref, target, ref, target, ...
The target is timed by pytest-benchmark itself (``benchmark.pedantic``); the reference runs in
pedantic's ``setup`` hook, which pytest-benchmark calls before each round and does not time, and
is timed here. Load that comes and goes therefore hits both sides of a pair alike, and the median
of the per-pair ratios is what the gate compares.
"""
from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from perf.gate import INJECT_ENV, paired_ratios, parse_factor, robust_ratio

if TYPE_CHECKING:  # torch is imported where a CUDA device needs it: the plugin runs torch-free suites too
    import torch

#: The clock every timer here reads; the plugin picks it (``--perf-clock``): ``time.thread_time``
#: (CPU time of this thread; with one torch thread all compute runs on it) or ``time.perf_counter``.
clock = time.perf_counter


#: Seconds (wall) of warm-up before timing, whatever the budget (baselines, measured with a larger
#: budget, must start timing from the same steady state as normal runs).
WARMUP_S = 0.5


def use_clock(kind: str) -> None:
    global clock
    clock = {"cpu": time.thread_time, "wall": time.perf_counter}[kind]


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer read right after sees the work done (CUDA)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronize: timing it measures the work, not the launch."""
    if device.type != "cuda":
        return fn
    import torch

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    call.__name__ = getattr(fn, "__name__", "call")
    return call


# --------------------------------------------------------------------------------------------
# Injected slowdown (sensitivity self-check)
# --------------------------------------------------------------------------------------------


def slowed(fn: Callable, factor: float, device: torch.device | None = None) -> Callable:
    """``fn`` made ``factor`` times slower: after each call, busy-wait ``(factor - 1)`` x its duration.

    The slowdown is exact relative to the call's own time (noise included), so the self-check
    injects precisely the stated factor. Busy-waiting (not sleeping) keeps the core occupied like
    real extra compute would.
    """
    if factor == 1.0:
        return fn

    def wrapper(*args, **kwargs):
        if device is not None:
            synchronize(device)
        t0 = clock()
        result = fn(*args, **kwargs)
        if device is not None:
            synchronize(device)
        until = t0 + (clock() - t0) * factor
        while clock() < until:
            pass
        return result

    wrapper.__name__ = getattr(fn, "__name__", "slowed")
    wrapper.__wrapped__ = fn
    return wrapper


def slow_down_modules(model: torch.nn.Module, cls: type, factor: float) -> int:
    """Make the forward of every ``cls`` submodule ``factor`` times slower (instance attribute)."""
    if factor == 1.0:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, cls):
            m.forward = slowed(m.forward, factor)
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@contextmanager
def quiet_gc():
    """Collect garbage now, then keep the collector off while timing."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_once(fn: Callable[[], object]) -> float:
    t0 = clock()
    fn()
    return clock() - t0


@dataclass
class Paired:
    target: list  # seconds per target call, one per pair
    reference: list  # seconds per reference call (per single call when repeated)
    repeat: int  # how many reference calls make one reference block

    @property
    def ratios(self) -> list:
        return paired_ratios(self.target, self.reference)

    @property
    def ratio(self) -> float:
        return robust_ratio(self.ratios)

    @property
    def target_median(self) -> float:
        return robust_ratio(self.target)

    @property
    def reference_median(self) -> float:
        return robust_ratio(self.reference)


def plan(
    target: Callable,
    reference: Callable,
    *,
    match: bool,
    budget_s: float,
    min_pairs: int,
    max_pairs: int,
    warmup: int,
    warmup_s: float = 0.0,
):
    """Warm both up, then choose the reference repeat count and the number of pairs.

    Warm-up alternates reference and target for at least ``warmup`` pairs and ``warmup_s`` seconds
    (wall), so that first-call effects (compilation, allocator growth, page faults of fresh large
    buffers) are over before timing: a drift left in the timed pairs would make the median depend
    on how many pairs were taken.
    """
    ta_all, tb_all = [], []
    deadline = time.perf_counter() + warmup_s
    while len(ta_all) < max(1, warmup) or time.perf_counter() < deadline:
        tb_all.append(time_once(reference))
        ta_all.append(time_once(target))
    ta, tb = min(ta_all[-3:]), min(tb_all[-3:])
    repeat = max(1, min(1000, round(ta / tb))) if match and tb > 0 else 1
    pair_cost = ta + repeat * tb
    pairs = int(budget_s / pair_cost) if pair_cost > 0 else max_pairs
    return repeat, max(min_pairs, min(max_pairs, pairs))


def _reference_block(reference: Callable, repeat: int) -> Callable[[], float]:
    def run() -> float:
        t0 = clock()
        for _ in range(repeat):
            reference()
        return (clock() - t0) / repeat

    return run


def paired_benchmark(
    benchmark,
    target: Callable,
    reference: Callable,
    *,
    match: bool = True,
    budget_s: float = 1.0,
    min_pairs: int = 5,
    max_pairs: int = 200,
    warmup: int = 1,
    pairs: int | None = None,
) -> Paired | None:
    """Benchmark ``target`` with pytest-benchmark, interleaved with timed ``reference`` calls.

    ``match=True`` repeats the reference so that one reference block lasts about as long as one
    target call (pairs of similar length cancel slow drifts of the machine's speed). With an
    explicit ``pairs`` there is no planning (and no warmup here: the caller warmed up), the
    reference runs once per pair. Returns None when benchmarking is disabled
    (``--benchmark-disable``): the target then ran once, as a smoke test.
    """
    if benchmark.disabled:
        benchmark.pedantic(target, rounds=1)
        return None
    with quiet_gc():
        if pairs is None:
            repeat, pairs = plan(
                target,
                reference,
                match=match,
                budget_s=budget_s,
                min_pairs=min_pairs,
                max_pairs=max_pairs,
                warmup=warmup,
                warmup_s=WARMUP_S,
            )
        else:
            repeat = 1
        block = _reference_block(reference, repeat)
        ref_times: list = []

        def setup():
            ref_times.append(block())

        benchmark.pedantic(target, setup=setup, rounds=pairs, warmup_rounds=0, iterations=1)
    target_times = list(benchmark.stats.stats.data)
    return Paired(target=target_times, reference=ref_times[-len(target_times):], repeat=repeat)


def paired_again(target: Callable, reference: Callable, *, repeat: int, pairs: int) -> Paired:
    """The confirmation measurement: the same interleaving, outside pytest-benchmark."""
    with quiet_gc():
        block = _reference_block(reference, repeat)
        t_ref, t_tgt = [], []
        block()  # one more warm pair
        time_once(target)
        for _ in range(pairs):
            t_ref.append(block())
            t_tgt.append(time_once(target))
    return Paired(target=t_tgt, reference=t_ref, repeat=repeat)


def plain_benchmark(
    benchmark,
    target: Callable,
    *,
    budget_s: float = 1.0,
    min_rounds: int = 3,
    max_rounds: int = 200,
    warmup: int = 1,
    rounds: int | None = None,
) -> list | None:
    """Benchmark ``target`` alone (no reference); returns the per-round times."""
    if benchmark.disabled:
        benchmark.pedantic(target, rounds=1)
        return None
    with quiet_gc():
        if rounds is None:
            t = float("inf")
            deadline = time.perf_counter() + WARMUP_S
            n = 0
            while n < max(1, warmup) or time.perf_counter() < deadline:
                t = min(t, time_once(target))
                n += 1
            rounds = max(min_rounds, min(max_rounds, int(budget_s / t) if t > 0 else max_rounds))
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=0, iterations=1)
    return list(benchmark.stats.stats.data)


def env_factor() -> float:
    return parse_factor(os.environ.get(INJECT_ENV))
