"""Batches above 8: the ISA's own GEMM against ATen's on decoded blocks, and both against ``nn.Linear``.

Plain script (not a test): ``python -m perf.own_gemm_ab [--shape 3072x3072] [--batches 9,16,32,64,512]
[--rounds 5]``. One process, 1 torch thread, thread CPU time: per round and batch, the memory-saving
layer (``ProjectiveLinear``, ``cache_weight=False``, ``QinsConfig(packed=...)``) with the ``own_gemm``
knob at 0 (ATen's BLAS on decoded blocks) and at 2 (the ISA's own GEMM: AVX2's straight from the codes
up to batch 96), and ``nn.Linear`` fp32, interleaved; prints the medians and their ratios, and the
largest difference between the two GEMMs' outputs (summation order only).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import qins
import qins.kernels as qk

OWN_GEMM = 5  # index of own_gemm in get_tuning()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="3072x3072", help="OUTxIN")
    parser.add_argument("--batches", default="9,16,32,64,512")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    mod = qk.native_module()
    if mod is None:
        raise SystemExit("the native CPU kernels are not available")
    torch.set_num_threads(1)
    knobs = list(mod.get_tuning())

    def own_gemm(value: int) -> None:
        mod.set_tuning(*(value if i == OWN_GEMM else k for i, k in enumerate(knobs)))

    out, inn = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    linear = nn.Linear(inn, out)
    print(f"# {qk.backend_name('cpu')}, 1 thread, thread CPU time, medians of {args.rounds} interleaved rounds")
    try:
        for packed in (True, False):
            layer = qins.ProjectiveLinear.from_linear(linear, qins.QinsConfig(packed=packed), cache_weight=False)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, inn)
                times: dict[str, list[float]] = {"blas": [], "own": [], "fp32": []}
                with torch.no_grad():
                    own_gemm(0)
                    y_blas = layer(x)
                    own_gemm(2)
                    diff = (layer(x) - y_blas).abs().max().item()
                    for _ in range(args.rounds):
                        for name, value in (("blas", 0), ("own", 2), ("fp32", None)):
                            if value is not None:
                                own_gemm(value)
                            t0 = time.thread_time()
                            (linear if value is None else layer)(x)
                            times[name].append(time.thread_time() - t0)
                ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                print(f"{args.shape} {'packed' if packed else 'split'} batch {batch:4d}: own {ms['own']:8.2f} ms, "
                      f"blas {ms['blas']:8.2f} ms, nn.Linear {ms['fp32']:8.2f} ms; own {ms['own'] / ms['fp32']:.3f}x, "
                      f"blas {ms['blas'] / ms['fp32']:.3f}x nn.Linear; max |own - blas| {diff:.1e}", flush=True)
    finally:
        mod.set_tuning(*knobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
