"""The memory-saving layer (fused ``qins::linear``) against ``nn.Linear`` fp32, with the absolute targets.

Shapes ``[out, in]`` 3072x3072 and 3072x8192; formats packed (1 B/weight) and split (2 B/weight),
both the default (``QinsConfig(packed=...)``: 16 shared tables); cases:

* ``b1-hot``: batch 1, one layer called repeatedly (its codes stay in cache);
* ``b1-cold``: batch 1, round-robin over a stack of distinct layers (and distinct ``nn.Linear`` s)
  whose QINS codes alone exceed twice the L3 cache — what token generation sees;
* ``b8``: 8 rows of input, the largest batch of the LUT-GEMV (a few sequences decoding together);
* ``b32``, ``b512``: 32 and 512 rows of input, where the GEMM dominates.

Each QINS call is interleaved with the same case's ``nn.Linear`` call (paired ratios, thread CPU
time, 1 torch thread). Figures: ``ratio_vs_linear``; at batch 1 also the achieved weight bandwidth
(``weight_gbps``: code and sign bytes read per second) and the **streaming floor**, a read of the
same bytes measured in the same test (``floor_gbps``, ``ratio_vs_floor``, ``floor_fraction``).

Gated against the baseline: at batch 1 ``ratio_vs_floor`` (the kernel and the floor are both
streams of the same bytes: like work) with ``--perf-codec-tol``; at batches 8, 32
and 512 ``ratio_vs_linear`` (both sides compute-bound: like work) with ``--perf-ratio-tol``. The issue's absolute
ratio targets (``TARGETS``) and the bandwidth target for packed layers at batch 1, cold (at least
60% of the floor, ``FLOOR_FRACTION_TARGET``) are judged too, a miss re-measured once before it
counts: the summary states each met or missed per CPU; ``--perf-targets=on`` asserts them
(``perf.targets.speed_targets_asserted``).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from perf.gate import HIGHER, Rule
from perf.timing import paired_again, paired_benchmark, slowed, synced

SHAPES = [(3072, 3072), (3072, 8192)]
FORMATS = ["packed", "split"]
CASES = {"b1-hot": 1, "b1-cold": 1, "b8": 8, "b32": 32, "b512": 512}
BUDGET_S = 1.5

#: the targets: (format, case, shape or None for all) -> the highest ratio_vs_linear allowed
TARGETS = {
    ("packed", "b1-cold", (3072, 3072)): 0.35,
    ("packed", "b1-cold", (3072, 8192)): 0.45,
    ("split", "b1-cold", None): 0.9,
    ("packed", "b32", None): 1.1,
    ("packed", "b512", None): 1.1,
    ("split", "b32", None): 1.1,
    ("split", "b512", None): 1.1,
}
#: the target for the achieved weight bandwidth of packed layers at batch 1, cold, as a
#: fraction of the streaming floor (asserted in _assert_targets)
FLOOR_FRACTION_TARGET = 0.6


def _l3_bytes() -> int:
    """The L3 (last-level) cache size from sysfs; 32 MiB if it cannot be read."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                return int(size.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        except (OSError, ValueError):
            continue
    return 32 << 20


def _target(fmt: str, case: str, shape: tuple[int, int]):
    return TARGETS.get((fmt, case, shape), TARGETS.get((fmt, case, None)))


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def stacks(device):
    """shape -> {"linear": [nn.Linear...], "packed": [...], "split": [...]}: distinct copies, enough
    that the packed codes of the stack exceed twice the L3 cache (the first of each is the hot one)."""
    from qins import ProjectiveLinear, QinsConfig

    out = {}
    for i, (o, n) in enumerate(SHAPES):
        torch.manual_seed(2000 + i)
        lin = torch.nn.Linear(n, o, bias=False).to(device).eval()
        count = max(2, math.ceil(2 * _l3_bytes() / (o * n)))
        layers = {"linear": [lin] + [torch.nn.Linear(n, o, bias=False).to(device).eval() for _ in range(count - 1)]}
        for extra in layers["linear"][1:]:
            extra.weight.data.copy_(lin.weight.data)
        for fmt in FORMATS:
            first = ProjectiveLinear.from_linear(lin, QinsConfig(packed=fmt == "packed"), cache_weight=False).eval()
            copies = [first]
            for _ in range(count - 1):  # same codes in distinct memory: as cold as distinct weights
                c = ProjectiveLinear(n, o, bias=False, config=first.config, cache_weight=False, device=device).eval()
                c.load_state_dict(first.state_dict())
                copies.append(c)
            layers[fmt] = copies
        out[(o, n)] = layers
    return out


def _weight_bytes(layer) -> int:
    return layer.stored.numel() + (layer.sign.numel() if layer.sign is not None else 0)


def _round_robin(items, fn):
    cycle = itertools.cycle(items)
    return lambda: fn(next(cycle))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{n}" for o, n in SHAPES])
def test_memory_saving_layer(benchmark, perf_gate, device, stacks, inject_factor, shape, fmt, case):
    o, n = shape
    benchmark.group = f"kernel {o}x{n} {case}"
    parts = stacks[shape]
    g = torch.Generator().manual_seed(o + n + CASES[case])
    x = torch.randn(CASES[case], n, generator=g).to(device)
    cold = case == "b1-cold"
    qins_layers = parts[fmt] if cold else parts[fmt][:1]
    linears = parts["linear"] if cold else parts["linear"][:1]
    target = synced(slowed(_round_robin(qins_layers, lambda m: m(x)), inject_factor, device), device)
    reference = synced(_round_robin(linears, lambda m: m(x)), device)
    p = paired_benchmark(benchmark, target, reference, budget_s=BUDGET_S * perf_gate.budget)
    if p is None:
        return
    figures = {
        "time_s": p.target_median,
        "linear_time_s": p.reference_median,
        "ratio_vs_linear": p.ratio,
        "pairs": len(p.target),
        "paired_ratios": [round(r, 5) for r in p.ratios],
        "stack_layers": len(qins_layers),
        "bytes_per_weight": _weight_bytes(qins_layers[0]) / (o * n),
        "kernel": qins_layers[0].extra_repr().rsplit("kernel=", 1)[-1],
    }
    gated = "ratio_vs_linear"
    rules = {"ratio_vs_linear": Rule(HIGHER, perf_gate.tol["ratio"])}
    if CASES[case] == 1:
        # The streaming floor: read the same code (and sign) bytes, as int64 words, from the same stack.
        words = [
            torch.cat(
                [m.stored.reshape(-1)] + ([m.sign.reshape(-1).view(torch.uint8)] if m.sign is not None else [])
            ).view(torch.int64)
            for m in qins_layers
        ]
        floor = synced(_round_robin(words, lambda w: w.sum()), device)
        pf = paired_again(target, floor, repeat=1, pairs=max(5, len(p.target)))
        nbytes = _weight_bytes(qins_layers[0])
        figures.update(
            weight_gbps=nbytes / p.target_median / 1e9,
            floor_gbps=nbytes / pf.reference_median / 1e9,
            ratio_vs_floor=pf.ratio,
            floor_fraction=1.0 / pf.ratio,
        )
        gated = "ratio_vs_floor"
        rules = {"ratio_vs_floor": Rule(HIGHER, perf_gate.tol["codec"])}

    def remeasure():
        if gated == "ratio_vs_floor":
            return {gated: paired_again(target, floor, repeat=1, pairs=len(p.target)).ratio}
        return {gated: paired_again(target, reference, repeat=p.repeat, pairs=len(p.target)).ratio}

    perf_gate.check(benchmark, figures, rules, remeasure, key=f"kernel/{fmt}/{o}x{n}/{case}")
    _assert_targets(perf_gate, benchmark, fmt, case, shape, figures, target, reference, p, floor if cold else None)


def _assert_targets(perf_gate, benchmark, fmt, case, shape, figures, target, reference, p, floor) -> None:
    """The absolute targets; a miss is measured once more before it counts. Reported met or missed,
    asserted under ``--perf-targets=on`` (``perf_gate.speed_target``)."""
    limit = _target(fmt, case, shape)
    benchmark.extra_info["target_ratio_vs_linear"] = limit
    if limit is None:
        return
    # a target met only on its re-measure says so: both values are in the line
    measured, missed = f"{figures['ratio_vs_linear']:.3f}", False
    if figures["ratio_vs_linear"] > limit:
        again = paired_again(target, reference, repeat=p.repeat, pairs=len(p.target)).ratio
        benchmark.extra_info["target_recheck_ratio_vs_linear"] = again
        measured, missed = f"{measured}, re-measured {again:.3f}", again > limit
    what = f"{fmt} {case} {shape}: ratio vs nn.Linear {measured}, target <= {limit}"
    perf_gate.speed_target(benchmark, figures["kernel"], what, what if missed else None)
    if floor is not None and fmt == "packed":
        # The bandwidth target: what the per-row tables (built 2 rows at a time) and the layers'
        # dispatcher bypass reach; measured per CPU in docs/perf.md.
        benchmark.extra_info["target_floor_fraction"] = FLOOR_FRACTION_TARGET
        recheck, missed = "", False
        if figures["floor_fraction"] < FLOOR_FRACTION_TARGET:
            again = 1.0 / paired_again(target, floor, repeat=1, pairs=len(p.target)).ratio
            benchmark.extra_info["target_recheck_floor_fraction"] = again
            recheck, missed = f", re-measured {again:.1%}", again < FLOOR_FRACTION_TARGET
        what = (f"{fmt} {case} {shape}: weight bandwidth {figures['floor_fraction']:.1%} of the streaming floor"
                f"{recheck}, target >= {FLOOR_FRACTION_TARGET:.0%}")
        perf_gate.speed_target(benchmark, figures["kernel"], what, what if missed else None)
