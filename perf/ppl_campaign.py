"""The perplexity table of one real causal LM, outside pytest (the figures of docs/accuracy.md).

    python -m perf.ppl_campaign --model smollm2 --windows 98 [--formats fp32,int8-row,...] [--json out.json]

Same measurement as perf/test_perplexity.py (``qins.testing``): windows of 512 scored tokens of the
Lee news corpus, BOS before every window where the model needs it, the decoder Linears of every
format quantized alike, calibration on 32 sequences of 512 tokens of Wikipedia prose. Prints a
markdown table: bytes/weight, perplexity, increase over fp32 (%), the difference to int8-per-row's
increase with its paired bootstrap 95% interval (points), and the conversion's CPU seconds
(calibration included for the calibrated formats). A progress line per format goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from qins.testing import lm_formats as F
from qins.testing import perplexity as P
from qins.testing.real_lm import load_causal_lm, news_text, wiki_text

CTX = 512
CALIBRATION_SEQUENCES = 32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--windows", type=int, default=98)
    ap.add_argument("--formats", default=",".join(F.FORMATS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    formats = args.formats.split(",")
    for needed in ("fp32", "int8-row"):
        if needed not in formats:
            formats.insert(0 if needed == "fp32" else 1, needed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok, model, bos = load_causal_lm(args.model)
    ids = tok(news_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    wins = P.windows(ids, CTX, args.windows)
    cal_ids = tok(wiki_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    batches = F.token_batches(cal_ids, CALIBRATION_SEQUENCES, CTX)
    if bos is not None:
        batches = [torch.cat([torch.full((b.shape[0], 1), bos, dtype=b.dtype), b[:, :-1]], 1) for b in batches]
    print(f"[ppl] {args.model} loaded, {len(wins)} windows ({len(wins) * CTX} tokens), {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    run = F.FormatRun(model, wins, batches, bos=bos)
    for fmt in formats:
        run.measure(fmt)
        print(
            f"[ppl] {fmt}: ppl {P.perplexity(run.nll[fmt]):.4f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True
        )
    nll, seconds = run.nll, run.convert_s
    ref, int8 = nll["fp32"], nll["int8-row"]
    rows = []
    for fmt in formats:
        iv = P.paired_bootstrap(nll[fmt], int8, ref)
        rows.append({"format": fmt, "bytes_per_weight": F.BYTES_PER_WEIGHT[fmt], "ppl": P.perplexity(nll[fmt]),
                     "increase_pct": P.increase_pct(nll[fmt], ref), "minus_int8": [iv.value, iv.low, iv.high],
                     "convert_cpu_s": seconds[fmt]})
    print(f"\n{args.model}, Lee news, {ref.numel()} tokens, ctx {CTX}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| format | B/w | ppl | increase over fp32 | minus int8-row, points [95%] | convert CPU s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        m = r["minus_int8"]
        print(f"| {r['format']} | {r['bytes_per_weight']} | {r['ppl']:.4f} | {r['increase_pct']:+.3f}% | "
              f"{m[0]:+.3f} [{m[1]:+.3f}, {m[2]:+.3f}] | {r['convert_cpu_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": int(ref.numel()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
