"""perf/memprobe.py, the end-to-end benchmarks' fresh-process probe, at more than one thread."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.perf_gate.support import ROOT

#: far above the probe's own time (a tiny Phi-3, two tokens: ~10-15 s on 2 cores); a hung child never ends
TIMEOUT_S = 120


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the probe forks and reads /proc (Linux only)")
def test_the_memory_probe_finishes_at_two_threads():
    """Each mode's child is forked from the parent after its warm-up: a parent that warmed up on two
    threads left an OpenMP pool whose workers the child does not have, and the child waited for them
    forever in its first parallel region."""
    # its own session, so that a hung run is killed with the children it forked
    proc = subprocess.Popen([sys.executable, "-m", "perf.memprobe", "fp32,qins-packed-memsave", "2", "2", "tiny"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"perf.memprobe at 2 threads did not finish in {TIMEOUT_S} s (a forked child hung)")
    assert proc.returncode == 0, err[-2000:]
    modes = [json.loads(line)["mode"] for line in out.splitlines() if line.startswith("{")]
    assert modes == ["fp32", "qins-packed-memsave"]
