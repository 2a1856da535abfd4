"""Shared tables against a range per row: layer speed, SmolLM2 end to end, and perplexity per table count.

    python -m perf.shared_tables_probe layers                 # batch-1 layers, hot, 1 thread
    python -m perf.shared_tables_probe e2e --tables 0 4 16    # SmolLM2-135M, embeddings too, 1 thread
    python -m perf.shared_tables_probe ppl --tables 16 qins-packed qins-split   # 98 windows, all cores

``layers`` and ``e2e`` time on thread CPU time, every variant interleaved in each round, medians of
the rounds. ``ppl`` is ``perf/test_perplexity.py``'s measurement (the same text, windows and
calibration) with the QINS formats' configs given ``shared_tables``. Figures: docs/perf.md and
docs/accuracy.md, "Shared tables".
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import qins
from qins.formats import QinsConfig


def _cpu_us(fn, n: int) -> float:
    fn()
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n * 1e6


def layers(rounds: int) -> None:
    nat = qins.kernels.native_module()
    torch.set_num_threads(1)
    for out, inn in [(576, 576), (1536, 576), (576, 1536), (3072, 3072), (49152, 576)]:
        w = torch.randn(out, inn, generator=torch.Generator().manual_seed(0)) * 0.02
        x = torch.randn(1, inn)
        row, shared = qins.encode(w, QinsConfig(shared_tables=0)), qins.encode(w, QinsConfig(shared_tables=16))
        calls = {"fp32": lambda x=x, w=w: torch.nn.functional.linear(x, w),
                 "per-row": lambda x=x, row=row: nat.linear(x, *row[:4], None, 1, 0),
                 "16 tables": lambda x=x, s=shared: nat.linear(x, *s[:4], None, 1, 0, s[4], s[5])}
        n = max(3, int(2e7 // (out * inn)))
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, fn in calls.items():
                times[k].append(_cpu_us(fn, n))
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"{out}x{inn} (out x in), us: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items())
              + f"; ratio to fp32: per-row {m['per-row'] / m['fp32']:.3f}, 16 tables {m['16 tables'] / m['fp32']:.3f}")


def e2e(tables: list[int], rounds: int, tokens: int) -> None:
    from qins.testing.real_lm import load_smollm2, news_text

    torch.set_num_threads(1)
    tok, model = load_smollm2()
    models = {"fp32": model}
    for n in tables:
        m = copy.deepcopy(model)
        qins.convert_model_to_projective(m, QinsConfig(shared_tables=n), skip=(), cache_weight=False, embeddings=True)
        models[f"shared_tables={n}"] = m
    ids = tok(news_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, :32]
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            start = time.thread_time()
            with torch.no_grad():
                m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            rates[k].append(tokens / (time.thread_time() - start))
    base = statistics.median(rates["fp32"])
    for k, v in rates.items():
        print(f"{k}: {statistics.median(v):.1f} tokens/s, {statistics.median(v) / base:.3f}x fp32")


def ppl(tables: int, formats: list[str]) -> None:
    from perf.test_perplexity import _run
    from qins.testing import lm_formats as F
    from qins.testing import perplexity as P
    from qins.testing.cores import usable_cores

    torch.set_num_threads(usable_cores())
    F._QINS.update({"qins-packed": QinsConfig(shared_tables=tables),
                    "qins-split": QinsConfig(packed=False, shared_tables=tables),
                    "qins-packed-emb": QinsConfig(shared_tables=tables)})
    run = _run(98)
    ref = run.measure("fp32")
    for fmt in formats:
        nll = run.measure(fmt)
        print(f"shared_tables={tables} {fmt}: perplexity increase {P.increase_pct(nll, ref):+.3f}%, "
              f"convert {run.convert_s[fmt]:.0f} CPU s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("layers").add_argument("--rounds", type=int, default=7)
    p = sub.add_parser("e2e")
    p.add_argument("--tables", type=int, nargs="+", default=[0, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p = sub.add_parser("ppl")
    p.add_argument("--tables", type=int, default=16)
    p.add_argument("formats", nargs="+")
    args = parser.parse_args()
    if args.what == "layers":
        layers(args.rounds)
    elif args.what == "e2e":
        e2e(args.tables, args.rounds, args.tokens)
    else:
        ppl(args.tables, args.formats)


if __name__ == "__main__":
    main()
