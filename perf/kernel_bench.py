"""Benchmark of ``qins::linear`` (native CPU kernels) against ``F.linear`` with an fp32 weight.

Plain script (not a test): ``python perf/kernel_bench.py [--shapes 3072x3072,3072x8192]
[--batches 1,32,512] [--formats packed,split] [--pairs 15] [--threads 1] [--json out.json]``.

Timing: ``time.thread_time`` (CPU time of this thread; with ``--threads 1`` all compute runs on
it) or wall time with ``--threads > 1``; the QINS op and ``F.linear`` run alternately and the
median of the per-pair ratios is reported. "cold" (batch 1) rotates round-robin over enough
distinct layers (of both kinds) that their weights exceed the L3 cache, as token generation
does; "hot" calls one layer repeatedly. Also reports the streaming floor (time to read the code
bytes: a C++-free ``torch.sum`` over the uint8 codes viewed as int64 words) and achieved GB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qins.kernels as qk  # noqa: E402


def l3_bytes() -> int:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"L3 cache:\s+([\d.]+)\s*(KiB|MiB|GiB)", out)
        if m:
            return int(float(m.group(1)) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)])
    except OSError:
        pass
    return 32 << 20


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        return "unknown"


def make_layer(out: int, inn: int, packed: bool, gen: torch.Generator):
    codes = torch.randint(0, 256, (out, inn), dtype=torch.uint8, generator=gen)
    sign = None if packed else (torch.randint(0, 2, (out, inn), dtype=torch.int8, generator=gen) * 2 - 1)
    lo = torch.rand(out, generator=gen) * -2 - 8
    hi = lo + 6
    bias = torch.randn(out, generator=gen)
    weight = torch.randn(out, inn, generator=gen) * 0.02
    return dict(codes=codes, sign=sign, lo=lo, hi=hi, bias=bias, weight=weight)


def paired(fa, fb, pairs: int, clock) -> tuple[float, float, float]:
    """Median seconds of fa, fb and the median of the per-pair ratios fa/fb (interleaved)."""
    fa(), fb()
    ta, tb, ratios = [], [], []
    for _ in range(pairs):
        t0 = clock()
        fa()
        t1 = clock()
        fb()
        t2 = clock()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def bench_case(out, inn, packed, batch, cold, pairs, clock, gen):
    wbytes = out * inn * (1 if packed else 2)
    fp32_bytes = out * inn * 4
    nlayers = 1
    if cold:
        nlayers = max(2, -(-3 * l3_bytes() // (2 * (fp32_bytes + wbytes))))  # 1.5x L3 of both kinds
    layers = [make_layer(out, inn, packed, gen) for _ in range(nlayers)]
    x = torch.randn(batch, inn, generator=gen)
    state = {"i": 0, "j": 0}

    def qins_call():
        L = layers[state["i"] % nlayers]
        state["i"] += 1
        torch.ops.qins.linear(x, L["codes"], L["sign"], L["lo"], L["hi"], L["bias"])

    def fp32_call():
        L = layers[state["j"] % nlayers]
        state["j"] += 1
        F.linear(x, L["weight"], L["bias"])

    reps = max(1, nlayers)  # time one full rotation per sample when cold
    fa = (lambda: [qins_call() for _ in range(reps)]) if cold else qins_call
    fb = (lambda: [fp32_call() for _ in range(reps)]) if cold else fp32_call
    tq, tf, ratio = paired(fa, fb, pairs, clock)
    tq /= reps
    tf /= reps
    return dict(out=out, inn=inn, fmt="packed" if packed else "split", batch=batch, cold=cold, layers=nlayers,
                qins_ms=tq * 1e3, fp32_ms=tf * 1e3, ratio=ratio, weight_GBps=wbytes / tq / 1e9)


def streaming_floor(out, inn, packed, pairs, clock, gen):
    """Seconds to stream the code bytes once (cold: rotating over > L3), via a sum of int64 words."""
    wbytes = out * inn * (1 if packed else 2)
    n = max(2, -(-3 * l3_bytes() // (2 * wbytes)))
    bufs = [torch.randint(0, 256, (wbytes,), dtype=torch.uint8, generator=gen) for _ in range(n)]
    words = [b.view(torch.int64) for b in bufs]
    times = []
    for i in range(pairs * n):
        t0 = clock()
        words[i % n].sum()
        times.append(clock() - t0)
    t = statistics.median(times)
    return dict(out=out, inn=inn, fmt="packed" if packed else "split", floor_ms=t * 1e3, floor_GBps=wbytes / t / 1e9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="3072x3072,3072x8192", help="comma list of OUTxIN")
    p.add_argument("--batches", default="1,32,512")
    p.add_argument("--formats", default="packed,split")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cold", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--tuning", default=None,
                   help="COL_BLOCK,GEMM_ROWS,GEMM_COLS,PREFETCH,PIPELINE,OWN_GEMM,ROW_CHUNK (native knobs, in "
                        "set_tuning's order; a prefix sets the first ones, the rest keep their values)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    backend = qk.backend_name("cpu")
    if args.tuning and qk.native_module() is not None:
        knobs = list(qk.native_module().get_tuning())
        given = [int(v) for v in args.tuning.split(",")]
        if len(given) > len(knobs):
            p.error(f"--tuning takes at most {len(knobs)} values, got {len(given)}")
        qk.native_module().set_tuning(*given, *knobs[len(given):])
    if qk.native_module() is not None:
        backend += " tuning=" + ",".join(str(v) for v in qk.native_module().get_tuning())
    print(f"# cpu: {cpu_model()}  L3: {l3_bytes() >> 20} MiB  backend: {backend} (ready in "
          f"{time.perf_counter() - t0:.1f} s)  threads: {args.threads}  torch {torch.__version__}")
    results = []
    for shape in args.shapes.split(","):
        out, inn = (int(v) for v in shape.lower().split("x"))
        for fmt in args.formats.split(","):
            packed = fmt == "packed"
            fl = streaming_floor(out, inn, packed, args.pairs, clock, gen)
            results.append(fl)
            print(f"{out}x{inn} {fmt:6s} floor  {fl['floor_ms']:8.3f} ms  {fl['floor_GBps']:6.1f} GB/s")
            for batch in (int(b) for b in args.batches.split(",")):
                for cold in ((False, True) if batch == 1 and not args.no_cold else (False,)):
                    r = bench_case(out, inn, packed, batch, cold, args.pairs, clock, gen)
                    results.append(r)
                    print(f"{out}x{inn} {fmt:6s} b={batch:<4d} {'cold' if cold else 'hot ':4s} "
                          f"qins {r['qins_ms']:8.3f} ms  fp32 {r['fp32_ms']:8.3f} ms  ratio {r['ratio']:.3f}  "
                          f"{r['weight_GBps']:6.1f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), backend=backend, threads=args.threads, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
