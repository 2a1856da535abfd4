"""The AVX2 path against ``nn.Linear`` fp32 and against an older revision's AVX2 path, in one process.

    python -m perf.avx2_probe                      # old = HEAD's kernel sources
    python -m perf.avx2_probe --old 0be90df --rounds 41 --shapes 3072x3072 3072x8192 --formats packed split

The memory-saving layer (``ProjectiveLinear(cache_weight=False)``, a range per row unless
``--shared-tables N``) runs under ``QINS_CPU_ISA`` (``avx2`` unless set); the old revision's
``qins/kernels/cpu`` sources are extracted with ``git show`` and built as a second extension, and
called on the same codes and logs. One torch thread; each round times ``nn.Linear``, the new layer,
the new kernel and the old kernel back to back (thread CPU time), so all see the same machine load;
the figures are medians over rounds of the per-round ratios: new and old against ``nn.Linear`` (the
new one through its layer, as users call it), old against new kernel for kernel (both called directly,
so the layer's Python call does not count against the new one). ``b1-cold`` round-robins over a stack of
distinct layers (and distinct ``nn.Linear`` s) whose fp32 weights exceed twice the L3 cache; ``bN``
calls one layer (hot), as ``perf/test_kernels.py`` does. Not a test: a measurement to report.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CPU_DIR = "qins/kernels/cpu"


def _git(*args: str, text: bool = True):
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=text).stdout


def _l3_bytes() -> int:
    from perf.test_kernels import _l3_bytes as l3

    return l3()


def build_old(rev: str):
    """The native module of ``rev``'s kernel sources (cached by content in the extensions root)."""
    from torch.utils.cpp_extension import get_default_build_root, load

    from qins.kernels.cpu import build as b

    names = _git("ls-tree", "--name-only", rev, CPU_DIR + "/").split()
    files = {Path(n).name: _git("show", f"{rev}:{n}", text=False) for n in names if n.endswith((".cpp", ".h"))}
    digest = hashlib.sha256(repr(sorted(files.items())).encode() + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    out = root / f"qins_old_omp_{digest}"
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    objs = []
    for unit, flags in b.ISA_UNITS:
        obj = out / (Path(unit).stem + ".o")
        if not obj.exists():
            cmd = ["c++", *b.COMMON_FLAGS, *b.DEFINES, *flags, "-c", str(src / unit), "-o", str(obj)]
            subprocess.run(cmd, check=True)
        objs.append(str(obj))
    # OpenMP as build.load_native compiles it (without it at::parallel_for runs on one thread)
    return load(name=out.name, sources=[str(src / "ops.cpp")],
                extra_cflags=[*b.COMMON_FLAGS, *b.DEFINES, *b.OPENMP_FLAGS], extra_ldflags=objs + b.OPENMP_FLAGS,
                extra_include_paths=[str(src)], build_directory=str(out), verbose=False)


def layers(o: int, n: int, fmt: str, count: int, shared_tables: int = 0):
    from qins import ProjectiveLinear, QinsConfig

    torch.manual_seed(o + n)
    lin = torch.nn.Linear(n, o, bias=False).eval()
    lins = [lin] + [torch.nn.Linear(n, o, bias=False).eval() for _ in range(count - 1)]
    for extra in lins[1:]:
        extra.weight.data.copy_(lin.weight.data)
    config = QinsConfig(packed=fmt == "packed", shared_tables=shared_tables)
    first = ProjectiveLinear.from_linear(lin, config, cache_weight=False).eval()
    qs = [first]
    for _ in range(count - 1):  # the same codes in distinct memory: as cold as distinct weights
        c = ProjectiveLinear(n, o, bias=False, config=first.config, cache_weight=False).eval()
        c.load_state_dict(first.state_dict())
        qs.append(c)
    return lins, qs


def measure(lins, qs, old, isa: int, batch: int, rounds: int, repeat: int):
    """Per-round times (s) of nn.Linear, the new layer, and the new and old kernels called directly
    with the same arguments (the layer adds its Python call, ~40 us at 576x576 on AMD EPYC 25/1: that alone would
    read as a slower kernel)."""
    import qins.kernels as qk

    new = qk.native_module()
    x = torch.randn(batch, qs[0].in_features, generator=torch.Generator().manual_seed(batch))
    cyc_l, cyc_q = itertools.cycle(lins), itertools.cycle(qs)
    spacing = qs[0].config.spacing_id

    def run_lin():
        cyc_l.__next__()(x)

    def run_new():
        cyc_q.__next__()(x)

    def call(module, m):  # the shared tables' arguments only for them (older builds take none)
        rows = () if m.row_table is None else (m.row_table, m.row_scale)
        return module.linear(x, m.stored, m.sign, m.log_min, m.log_max, None, spacing, isa, *rows)

    def run_kernel():
        call(new, cyc_q.__next__())

    def run_old():
        call(old, cyc_q.__next__())

    m = qs[0]
    y_old = call(old, m)
    y_new = m(x)
    diff = (y_old - y_new).abs().max().item() / max(y_new.abs().max().item(), 1e-30)
    fns = {"linear": run_lin, "new": run_new, "kernel": run_kernel, "old": run_old}
    for fn in fns.values():  # warm-up: a full cycle of the stack each
        for _ in range(len(qs)):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(repeat):
                fn()
            times[k].append((time.thread_time() - t0) / repeat)
    return times, diff


def _case_arg(case: str) -> str:
    if case != "b1-cold" and not re.fullmatch(r"b[1-9][0-9]*(-hot)?", case):
        raise argparse.ArgumentTypeError(f"{case!r}: b1-cold, or bN / bN-hot (a batch of N on one layer, hot)")
    return case


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default="HEAD", help="git revision of the old kernel sources (default HEAD)")
    p.add_argument("--shapes", nargs="+", default=["3072x3072", "3072x8192"])
    p.add_argument("--formats", nargs="+", default=["packed"], choices=["packed", "split"])
    p.add_argument("--cases", nargs="+", default=["b1-cold", "b32"], type=_case_arg,
                   help="b1-cold, or bN / bN-hot: batch N on one layer (hot); default b1-cold b32")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--shared-tables", type=int, default=0,
                   help="the layers' QinsConfig.shared_tables (default 0: a range per row, which every old build "
                        "reads; shared tables need an --old revision that has them)")
    args = p.parse_args(argv)
    os.environ.setdefault("QINS_CPU_ISA", "avx2")
    torch.set_num_threads(1)
    import qins.kernels as qk

    isa = qk.cpu_isa()
    old = build_old(args.old)
    new_rev = _git("rev-parse", "--short", "HEAD").strip()
    dirty = _git("status", "--porcelain", CPU_DIR).strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, torch {torch.__version__}, 1 thread, "
          f"QINS_CPU_ISA={os.environ['QINS_CPU_ISA']} ({qk.backend_name('cpu')}); new = {new_rev}"
          f"{' + working tree' if dirty else ''}, old = {args.old}; {args.rounds} rounds, medians")
    print("| shape | format | case | nn.Linear ms | new ms | old ms | new/linear | old/linear | old/new kernel "
          "| max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for shape in args.shapes:
            o, n = map(int, shape.split("x"))
            count = max(2, math.ceil(2 * _l3_bytes() / (4 * o * n))) if "b1-cold" in args.cases else 1
            for fmt in args.formats:
                lins, qs = layers(o, n, fmt, count, args.shared_tables)
                for case in args.cases:
                    batch = 1 if case == "b1-cold" else int(case[1:].removesuffix("-hot"))
                    stack = slice(None) if case == "b1-cold" else slice(0, 1)
                    repeat = 1 if case == "b1-cold" else (3 if batch >= 32 else max(1, 20 // batch))
                    t, diff = measure(lins[stack], qs[stack], old, isa, batch, args.rounds, repeat)
                    med = {k: statistics.median(v) for k, v in t.items()}
                    r = {k: statistics.median(a / b for a, b in zip(t[k], t[ref])) for k, ref in
                         (("new", "linear"), ("old", "linear"))}
                    on = statistics.median(a / b for a, b in zip(t["old"], t["kernel"]))
                    print(f"| {o}x{n} | {fmt} | {case} | {med['linear'] * 1e3:.3f} | {med['new'] * 1e3:.3f} | "
                          f"{med['old'] * 1e3:.3f} | {r['new']:.3f} | {r['old']:.3f} | {on:.2f} | {diff:.1e} |",
                          flush=True)
                del lins, qs


if __name__ == "__main__":
    sys.exit(main())
