"""Benchmark of ``qins::linear``'s Triton backend on a CUDA GPU against ``F.linear`` (fp32, bf16).

Plain script (run by ``perf/gpu_check.sh`` on a lent GPU machine; CI has no GPU):
``python perf/cuda_bench.py [--shapes 3072x3072,3072x8192] [--batches 1,8,32,512] [--rounds 7]
[--json out.json]``. ``--smoke`` runs tiny shapes on the CPU through the Triton interpreter
(``TRITON_INTERPRET=1``) to check the script itself; its times mean nothing.

What is timed: for each shape, format (packed 1 B/w, split 2 B/w) and batch, every kind below is
captured in one CUDA graph of ``iters`` calls that rotate round-robin over a stack of distinct
layers of that kind whose bytes together exceed 3x the GPU's L2 cache (weights *cold*, as in token
generation), and the graph is replayed and timed with CUDA events. Rounds alternate the order of
the kinds; each figure is the median over rounds, each ratio the median of per-round ratios
against fp32 ``F.linear`` measured in the same round. The kinds: ``fp32`` (``F.linear``, fp32
weight, TF32 off), ``bf16`` (``F.linear`` with bf16 x and weight: a 2 B/w peer), ``reference``
(``qins.kernels.reference.linear``: decode the whole weight, then matmul), ``floor`` (a sum over
the codes' bytes: the time to stream them once), and ``triton:<config>`` for each candidate
launch configuration of :mod:`qins.kernels.triton_kernel` (gemv for batches up to 16, tile from
8), plus ``triton:default`` (``triton_kernel.linear``'s default config). ``eager:`` rows time calls
without a graph (Python and launch overheads included), at batch 1: ``fp32``, ``qins-op``
(``torch.ops.qins.linear``, the default dispatch), ``triton-linear`` (the kernel wrapper alone),
``triton-table`` (the table launch alone; ``graph:triton-table`` its GPU time).

Every Triton output of the first layer is compared with the reference on the GPU: the largest
``|y - y_ref| / (|x|·|ŵ|ᵀ)`` is reported (``rel``; the tests' bound is ``2·γ_n``, ~2e-4 at n=3072).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qins.kernels as qk  # noqa: E402
from qins.formats import decode_codes  # noqa: E402
from qins.kernels import reference  # noqa: E402


def make_layers(n: int, out: int, inn: int, packed: bool, device: torch.device, gen: torch.Generator) -> list[dict]:
    layers = []
    for _ in range(n):
        codes = torch.randint(0, 256, (out, inn), dtype=torch.uint8, generator=gen)
        sign = None if packed else (torch.randint(0, 2, (out, inn), dtype=torch.int8, generator=gen) * 2 - 1)
        lo = torch.rand(out, generator=gen) * -2 - 8
        t = dict(codes=codes, sign=sign, lo=lo, hi=lo + 6, bias=torch.randn(out, generator=gen))
        layers.append({k: (None if v is None else v.to(device)) for k, v in t.items()})
    return layers


def stack_size(layer_bytes: int, cache_bytes: int) -> int:
    return max(2, -(-3 * cache_bytes // layer_bytes))


class Timer:
    """Seconds per call of ``fn(i)`` over ``iters`` calls (i = 0..iters-1): a CUDA graph on CUDA."""

    def __init__(self, fn, iters: int, device: torch.device, graph: bool = True):
        self.fn, self.iters, self.device = fn, iters, device
        self.graph = None
        if device.type == "cuda" and graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(iters):
                    fn(i)  # warm-up (compiles, allocates) outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for i in range(iters):
                    fn(i)
        else:
            for i in range(iters):
                fn(i)

    def __call__(self) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            for i in range(self.iters):
                self.fn(i)
            return (time.perf_counter() - t0) / self.iters
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            for i in range(self.iters):
                self.fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.iters


def rel_error(y: torch.Tensor, y_ref: torch.Tensor, x: torch.Tensor, L: dict) -> float:
    w = decode_codes(L["codes"], L["sign"], L["lo"], L["hi"], dtype=torch.float32, spacing="log").double()
    scale = x.double().abs() @ w.abs().T + L["bias"].double().abs()
    return ((y.double() - y_ref.double()).abs() / scale.clamp_min(1e-300)).max().item()


def bench(out: int, inn: int, packed: bool, batch: int, args, device, gen, cache_bytes: int) -> list[dict]:
    tk = qk.triton_module()
    code_bytes = out * inn * (1 if packed else 2)
    nq = stack_size(code_bytes, cache_bytes)
    nf = stack_size(out * inn * 4, cache_bytes)
    qins_layers = make_layers(nq, out, inn, packed, device, gen)
    w32 = [torch.randn(out, inn, generator=gen).mul_(0.02).to(device) for _ in range(nf)]
    n16 = stack_size(out * inn * 2, cache_bytes)
    w16 = [w32[i % nf].to(torch.bfloat16) for i in range(n16)]  # distinct copies: cold like the rest
    b32 = [torch.randn(out, generator=gen).to(device) for _ in range(nf)]
    x = torch.randn(batch, inn, generator=gen).to(device)
    x16 = x.to(torch.bfloat16)
    floor_bufs = [L["codes"] if packed else torch.cat([L["codes"], L["sign"].view(torch.uint8)]) for L in qins_layers]
    floor_words = [b.view(-1).view(torch.int32) if b.numel() % 4 == 0 else b.view(-1) for b in floor_bufs]

    def q(i: int, config=None):
        L = qins_layers[i % nq]
        return tk.linear(x, L["codes"], L["sign"], L["lo"], L["hi"], L["bias"], config=config)

    kinds = {
        "fp32": lambda i: F.linear(x, w32[i % nf], b32[i % nf]),
        "bf16": lambda i: F.linear(x16, w16[i % n16], None),
        "reference": lambda i: reference.linear(x, qins_layers[i % nq]["codes"], qins_layers[i % nq]["sign"],
                                                qins_layers[i % nq]["lo"], qins_layers[i % nq]["hi"],
                                                qins_layers[i % nq]["bias"]),
        "floor": lambda i: floor_words[i % nq].sum(dtype=torch.int64),
        "triton:default": q,
    }
    y_ref = reference.linear(x, *(qins_layers[0][k] for k in ("codes", "sign", "lo", "hi", "bias")))
    errors = {"triton:default": rel_error(q(0), y_ref, x, qins_layers[0])}
    for cfg in tk.CANDIDATES:
        if (cfg.kind == "gemv" and batch > 16) or (cfg.kind == "tile" and batch < 8):
            continue
        try:
            errors[f"triton:{cfg.name}"] = rel_error(q(0, cfg), y_ref, x, qins_layers[0])
        except Exception as exc:  # noqa: BLE001 - a config that does not compile: report, go on
            print(f"  triton:{cfg.name}: failed ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
            continue
        kinds[f"triton:{cfg.name}"] = (lambda c: (lambda i: q(i, c)))(cfg)
    timers = {}
    for name, fn in kinds.items():
        try:
            timers[name] = Timer(fn, args.iters, device)
        except Exception as exc:  # noqa: BLE001 - report, time the rest
            print(f"  {name}: not timed ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
    if batch == 1 and device.type == "cuda":
        timers["eager:fp32"] = Timer(kinds["fp32"], args.iters, device, graph=False)
        timers["eager:qins-op"] = Timer(
            lambda i: torch.ops.qins.linear(
                x, *(qins_layers[i % nq][k] for k in ("codes", "sign", "lo", "hi", "bias"))
            ),
            args.iters, device, graph=False)
        timers["eager:triton-linear"] = Timer(q, args.iters, device, graph=False)  # no custom-op layer
        timers["eager:triton-table"] = Timer(
            lambda i: tk.table(qins_layers[i % nq]["lo"], qins_layers[i % nq]["hi"], packed),
            args.iters, device, graph=False)
        timers["graph:triton-table"] = Timer(
            lambda i: tk.table(qins_layers[i % nq]["lo"], qins_layers[i % nq]["hi"], packed), args.iters, device)
    samples: dict[str, list[float]] = {k: [] for k in timers}
    names = list(timers)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(timers[name]())
    rows = []
    base = samples["fp32"]
    for name, ts in samples.items():
        ref = samples["eager:fp32"] if name.startswith("eager:") else base
        rows.append(dict(
            out=out, inn=inn, fmt="packed" if packed else "split", batch=batch, kind=name,
            us=statistics.median(ts) * 1e6, ratio_vs_fp32=statistics.median(a / b for a, b in zip(ts, ref)),
            weight_GBps=(code_bytes / statistics.median(ts) / 1e9)
            if name.startswith(("triton", "floor", "eager:q", "eager:triton-linear")) else None,
            rel=errors.get(name), layers={"fp32": nf, "eager:fp32": nf, "bf16": n16}.get(name, nq),
        ))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="3072x3072,3072x8192", help="comma list of OUTxIN")
    p.add_argument("--batches", default="1,8,16,32,512")
    p.add_argument("--formats", default="packed,split")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.shapes, args.batches, args.rounds, args.iters = "40x72", "1,9", 2, 2
        device, cache_bytes = torch.device("cpu"), 1 << 14
    else:
        device = torch.device("cuda")
        cache_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    head = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
                torch=torch.__version__, triton=__import__("triton").__version__, cache_bytes=cache_bytes,
                backend=qk.backend_name(device) if device.type == "cuda" else "triton (interpreted)")
    print("# " + "  ".join(f"{k}: {v}" for k, v in head.items()), flush=True)
    results = []
    for shape in args.shapes.split(","):
        out, inn = (int(v) for v in shape.lower().split("x"))
        for fmt in args.formats.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows = bench(out, inn, fmt == "packed", batch, args, device, gen, cache_bytes)
                results += rows
                for r in rows:
                    gb = "" if r["weight_GBps"] is None else f"{r['weight_GBps']:7.0f} GB/s"
                    rel = "" if r["rel"] is None else f"rel {r['rel']:.1e}"
                    print(f"{out}x{inn} {fmt:6s} b{batch:<4d} {r['kind']:32s} {r['us']:9.2f} us  "
                          f"{r['ratio_vs_fp32']:6.3f}x fp32  {gb:13s} {rel}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(head=head, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
