"""CPU time and output of one calibrated conversion of SmolLM2, as perf/test_perplexity.py builds it.

``python -m perf.calibrated_convert packed|split OUT.pt [--compare REF.pt] [--profile PROF]``: the
calibration (32×512 tokens of the Wikipedia text, ``qins.testing.lm_formats.calibration_for``) is
saved to ``--calibration`` on the first run and loaded after, then ``quantized_copy`` converts with
it at ``--threads`` (1 by default); every buffer of every converted layer goes to ``OUT.pt``, and
``--compare`` checks each against a file written by another checkout (``torch.equal``).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("fmt", choices=["packed", "split"])
    ap.add_argument("out")
    ap.add_argument("--compare")
    ap.add_argument("--profile")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default="/tmp/qins_smollm2_calibration.pt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import qins
    from qins.testing import lm_formats as F
    from qins.testing.real_lm import load_smollm2, wiki_text

    tok, model = load_smollm2()
    if os.path.exists(args.calibration):
        cal = qins.Calibration(moments=torch.load(args.calibration))
    else:
        ids = tok(wiki_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
        t = time.process_time()
        cal = F.calibration_for(model, F.token_batches(ids, 32, 512))
        print(f"calibrate_cpu_s {time.process_time() - t:.1f}", flush=True)
        torch.save(cal.moments, args.calibration)
    fmt = f"qins-{args.fmt}-calibrated"
    prof = cProfile.Profile() if args.profile else None
    t, tw = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    q = F.quantized_copy(model, fmt, cal)
    if prof:
        prof.disable()
    print(f"convert_cpu_s {fmt} {time.process_time() - t:.1f} wall {time.perf_counter() - tw:.1f}", flush=True)
    if prof:
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    bufs = {f"{name}.{b}": v.clone() for name, mod in q.named_modules() if isinstance(mod, qins.ProjectiveLinear)
            for b, v in mod.state_dict().items()}
    torch.save(bufs, args.out)
    if args.compare:
        ref = torch.load(args.compare)
        bad = sorted(set(ref) ^ set(bufs)) + [k for k in ref if k in bufs and not (
            ref[k].dtype == bufs[k].dtype and ref[k].shape == bufs[k].shape and torch.equal(ref[k], bufs[k]))]
        print(f"{len(ref)} buffers compared, {len(bad)} differ {bad[:10]}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
