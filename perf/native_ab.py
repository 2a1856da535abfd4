"""Two builds of the native kernels in one process: an older revision's against this tree's.

Plain script (not a test): ``python -m perf.native_ab REV [--cases 3072x3072-packed-b8,...] [--rounds 5]``.
The suite's A/B (``perf/ab.py``) runs each revision's test in its own process, one after the other,
so the machine's phases (seconds long on a shared host) fall on one side: on AMD EPYC 25/1 the same
batch-8 layer took 4.4 ms in some windows and 7.4 in others. Here both modules are loaded at once
(each build is a pybind module named after its sources' digest, so they coexist) and called
alternately on the same layer and input, thread CPU time, 1 torch thread: a difference of a few
percent shows in every round. ``REV`` is exported with ``git archive`` and built in a subprocess
(``qins.kernels.native_module()`` under its tree). The outputs of the two builds are compared
(``torch.equal``; a kernel change may alter the summation order, reported then, not an error).

Per case and round: medians of old, new and ``nn.Linear`` (ms) and the median of the paired
new/old ratios; at the end the median of those over the rounds.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

import qins
import qins.kernels as qk
from perf.ab import export_revision, tree_env

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = "3072x3072-packed-b1,3072x3072-packed-b8,3072x3072-split-b8,3072x8192-packed-b32"


def load_extension(path: str) -> ModuleType:
    """The pybind module in the shared object ``path`` (its name is the file's stem)."""
    name = Path(path).name.split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
    loader.exec_module(module)
    return module


def build_revision(rev: str, dest: Path) -> str:
    """Export ``rev`` to ``dest``, build its native module there; the shared object's path."""
    tree = export_revision(ROOT, rev, dest)
    code = "import qins.kernels as k; m = k.native_module(); print(m.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"building {rev}'s native module failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def kernel_args(layer: qins.ProjectiveLinear, x: torch.Tensor) -> tuple:
    """The arguments the layer passes to the native ``linear`` for ``x`` (captured from one call)."""
    real, captured = qk.native_module(), {}

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def linear(self, *args):
            captured["args"] = args
            return real.linear(*args)

    saved, qk._native = qk._native, Spy()
    try:
        layer(x)
    finally:
        qk._native = saved
    return captured["args"]


def run_case(old: ModuleType, new: ModuleType, case: str, rounds: int, window_s: float) -> float:
    shape, fmt, batch = case.split("-")
    out, inn = (int(v) for v in shape.split("x"))
    torch.manual_seed(2000)
    linear = torch.nn.Linear(inn, out, bias=False).eval()
    layer = qins.ProjectiveLinear.from_linear(linear, qins.QinsConfig(packed=fmt == "packed"), cache_weight=False)
    x = torch.randn(int(batch.lstrip("b")), inn, generator=torch.Generator().manual_seed(out + inn))
    args = kernel_args(layer.eval(), x)
    calls = {"old": lambda: old.linear(*args), "new": lambda: new.linear(*args), "fp32": lambda: linear(x)}
    same = torch.equal(calls["old"](), calls["new"]())
    for _ in range(5):
        for call in calls.values():
            call()
    per_round = []
    for r in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in calls}
        end = time.perf_counter() + window_s
        while time.perf_counter() < end:
            for name, call in calls.items():
                t0 = time.thread_time()
                call()
                times[name].append(time.thread_time() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
        per_round.append(ratio)
        print(f"{case} round {r}: old {ms['old']:.3f} ms, new {ms['new']:.3f} ms, nn.Linear {ms['fp32']:.3f} ms; "
              f"new/old {ratio:.3f}", flush=True)
    result = statistics.median(per_round)
    print(f"{case}: new/old {result:.3f} (median of {rounds} rounds); outputs {'equal' if same else 'differ'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the older revision (git rev-parse syntax)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="OUTxIN-packed|split-bBATCH, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=1.5, help="seconds of interleaved calls per round")
    args = parser.parse_args(argv)
    new_module = qk.native_module()
    if new_module is None:
        raise SystemExit("the native CPU kernels are not available")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        old_module = load_extension(build_revision(args.rev, Path(tmp) / "old"))
    print(f"# old {args.rev} ({Path(old_module.__file__).name}), new this tree ({Path(new_module.__file__).name}); "
          f"{qk.backend_name('cpu')}, 1 thread, thread CPU time")
    with torch.inference_mode():
        for case in args.cases.split(","):
            run_case(old_module, new_module, case, args.rounds, args.window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
