"""The perf suite's command-line options (``--perf-*``) and their defaults.

Tolerances are relative (0.15 = a figure may be 15% worse than its baseline) except the accuracy
ones, which are in the figure's unit (dB, absolute cosine, percentage points of perplexity).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from perf.gate import INJECT_ENV
from perf.targets import TARGET_CHOICES

#: the default of every option that has one, by option name without ``--perf-``
DEFAULTS = {
    "threads": 1,
    "ratio_tol": 0.15,
    "codec_tol": 0.50,
    "e2e_tol": 0.30,
    "cache_gain_tol": 0.5,
    "memory_tol": 0.10,
    "backstop": "min:900%",
    "sqnr_tol_db": 0.5,
    "cosine_tol": 1e-4,
    "ppl_tol_pct": 0.05,
}



def add_options(parser: pytest.Parser) -> None:
    """The ``--perf-*`` options (``pytest --help``, group "qins-perf"); defaults from :data:`DEFAULTS`."""
    g = parser.getgroup("qins-perf", "QINS perf gate (perf/README.md)")
    g.addoption(
        "--perf-threads",
        type=int,
        default=DEFAULTS["threads"],
        help="torch.set_num_threads for the perf suite. Default: %(default)s",
    )
    g.addoption(
        "--perf-inject-slowdown",
        metavar="FACTOR",
        default=None,
        help=f"Self-check: make every QINS forward FACTOR times slower (busy-wait). Same as env {INJECT_ENV}=FACTOR.",
    )
    g.addoption(
        "--perf-ratio-tol",
        type=float,
        default=DEFAULTS["ratio_tol"],
        help="Allowed rise of a layer ratio vs its baseline. Default: %(default)s",
    )
    g.addoption(
        "--perf-codec-tol",
        type=float,
        default=DEFAULTS["codec_tol"],
        help="Allowed rise of a decode/encode-dominated ratio (decode, encode, memory-saving forward at batch 1 "
        "and memory-saving generation vs FP32). Default: %(default)s",
    )
    g.addoption(
        "--perf-ppl-windows",
        type=int,
        default=98,
        help="perf/test_perplexity.py: windows of 512 scored tokens of the news text (98: 50,176 tokens). Default: "
             "%(default)s",
    )
    g.addoption(
        "--perf-e2e-tol",
        type=float,
        default=DEFAULTS["e2e_tol"],
        help="Allowed rise of an end-to-end ratio vs FP32. Default: %(default)s",
    )
    g.addoption(
        "--perf-cache-gain-tol",
        type=float,
        default=DEFAULTS["cache_gain_tol"],
        help="Allowed loss of the KV-cache gain (no-cache/cache time - 1) vs the baseline. Default: %(default)s",
    )
    g.addoption(
        "--perf-memory-tol",
        type=float,
        default=DEFAULTS["memory_tol"],
        help="Allowed rise of memory figures. Default: %(default)s",
    )
    g.addoption(
        "--perf-backstop",
        default=DEFAULTS["backstop"],
        help="Absolute --benchmark-compare-fail applied when comparing ('off' to disable). Default: %(default)s",
    )
    g.addoption(
        "--perf-budget",
        type=float,
        default=None,
        help="Scale the time (pairs) spent per benchmark. Default: 1, or 2 when saving a baseline (--benchmark-save).",
    )
    g.addoption(
        "--perf-clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="What the timers read: 'cpu' = CPU time of the benchmarking thread (time.thread_time; immune to "
        "other processes taking the core), 'wall' = time.perf_counter. 'auto': cpu on CPU-only runs, wall with CUDA.",
    )
    g.addoption(
        "--perf-mode",
        choices=["auto", "stored", "ab"],
        default="auto",
        help="With --benchmark-compare: 'auto' gates on a stored baseline measured on this CPU, else measures the "
        "newest baseline's revision here (A/B); 'stored' refuses A/B; 'ab' always does A/B. Default: %(default)s",
    )
    g.addoption(
        "--perf-ab-confirm",
        choices=["on", "off"],
        default="on",
        help="A figure beyond its limit (stored mode: twice, first measure and re-measure; A/B mode: in the A/B's "
        "rounds) is measured again in a same-work A/B against the baseline's revision on this machine, each side "
        "in fresh processes, before it fails; that A/B's verdict decides. Default: %(default)s",
    )
    g.addoption(
        "--perf-targets",
        choices=list(TARGET_CHOICES),
        default="report",
        help="The absolute speed targets (perf/test_kernels.py, perf/test_e2e.py): 'report' measures them and states "
        "each met or missed in the summary; 'on' also fails a test whose target is missed (after its re-measure). "
        "Memory targets are asserted always. Default: %(default)s",
    )
    g.addoption(
        "--perf-flat-storage",
        action="store_true",
        default=False,
        help="Do not add the per-CPU sub-directory to --benchmark-storage (baselines of every CPU then share one "
             "folder).",
    )
    g.addoption(
        "--perf-sqnr-tol-db",
        type=float,
        default=DEFAULTS["sqnr_tol_db"],
        help="Accuracy gate: allowed drop of an sqnr_db figure (dB). Default: %(default)s",
    )
    g.addoption(
        "--perf-ppl-tol-pct",
        type=float,
        default=DEFAULTS["ppl_tol_pct"],
        help="Accuracy gate: allowed rise of a ppl_increase_pct figure (perplexity increase over fp32, percentage "
             "points). Default: %(default)s",
    )
    g.addoption(
        "--perf-cosine-tol",
        type=float,
        default=DEFAULTS["cosine_tol"],
        help="Accuracy gate: allowed drop of a cosine figure (absolute). Default: %(default)s",
    )
    g.addoption("--perf-plot", metavar="PNG", default=None, help="Write a chart of this run vs the baseline to PNG.")
    g.addoption("--perf-table", metavar="MD", default=None, help="Write the figures of this run as a markdown table.")


def storage_dir(config: pytest.Config) -> Path | None:
    """pytest-benchmark's ``--benchmark-storage`` as a directory (None: not file storage)."""
    uri = str(config.getoption("benchmark_storage"))
    if "://" not in uri:
        return Path(uri)
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None  # elasticsearch: not validated here
