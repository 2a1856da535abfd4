"""pytest plugin of the QINS perf suite: the ratio gate, built on pytest-benchmark's own hooks.

Loaded by ``perf/conftest.py`` (so it is active for ``pytest perf`` only, never for ``pytest tests``).

What it adds to pytest-benchmark:

* ``--benchmark-compare`` becomes a gate. The baseline file that pytest-benchmark will compare
  against is located and validated at configure time; a missing, corrupt or foreign baseline is a
  usage error with a one-paragraph message saying how to create one (no traceback).
* ``perf_gate.check(...)``: each test gates ratio figures (QINS vs its interleaved FP32 reference)
  against the same figures stored in the baseline's ``extra_info``; an excess is re-measured once
  and only a confirmed excess fails the test, with a message naming the figure, the change, the
  limit and the baseline file.
* pytest-benchmark's absolute ``--benchmark-compare-fail`` stays as a generous backstop
  (default ``min:900%``, ``--perf-backstop``); its PerformanceRegression is reported without a
  traceback, re-measured as a same-work A/B of the benchmarks that tripped it (``_confirm_backstop``),
  and turns the exit status to 1 only when that A/B confirms it (or cannot run).
* Fixed threads, gc off while timing (``--benchmark-disable-gc`` forced on), a ``device`` fixture,
  the injected slowdown of the self-check, and the chart / figures table of the run.
"""
from __future__ import annotations

import contextlib

import gc
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import pytest

from perf import gate as G
from perf.gate import INJECT_ENV, parse_factor

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


class PerfState:
    """Per-session state: the baseline, the verdicts and the recorded figures."""

    def __init__(self, config):
        self.config = config
        self.baseline: Optional[G.Baseline] = None
        self.outcomes: list[G.Outcome] = []
        self.records: dict[str, dict] = {}  # fullname -> {"group", "name", "extra_info", "median"}
        self.by_key: dict[str, dict] = {}  # extra_info["key"] -> extra_info
        self.factor = 1.0
        self.threads = DEFAULTS["threads"]
        self.tol = {}
        self.budget = 1.0
        self.clock = "wall"
        self.backstop_failed = ""
        self.backstop_refuted = ""
        self.backstop_ab: list[str] = []  # the backstop's A/B confirmation, a line per benchmark
        self.cpu: dict = {}
        self.cpu_key = ""
        self.cpu_label = ""
        self.mode = "none"  # none | stored | ab
        self.mode_line = "no --benchmark-compare: figures are measured, not gated"
        self.accuracy_baseline: Optional[G.Baseline] = None
        self.accuracy_outcomes: list = []
        self.ab_base: Optional[G.Baseline] = None
        self.ab_rev = ""
        self.ab_old = None  # perf.ab.OldSide
        self.ab_outcomes: list = []
        self.ab_error = ""
        self.ab_seconds: list = []
        self.confirm_old = None  # perf.ab.OldSide for confirming stored-baseline failures
        self.confirm_error = ""
        self.confirm_count = 0  # A/B confirmations run in this session
        self.confirm_regressed = False  # one of them confirmed a regression
        self.targets = "report"  # --perf-targets
        #: every absolute speed target judged: (test, kernel path, "met" or "missed", what was measured)
        self.target_results: list[tuple[str, str, str, str]] = []
        #: every absolute accuracy target judged (CPU-independent): (test, "met" or "missed", what)
        self.accuracy_target_results: list[tuple[str, str, str]] = []


def _state(config) -> PerfState:
    return config.stash[_STATE_KEY]


_STATE_KEY = pytest.StashKey[PerfState]()


# --------------------------------------------------------------------------------------------
# Options and configuration
# --------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    g = parser.getgroup("qins-perf", "QINS perf gate (perf/README.md)")
    g.addoption("--perf-threads", type=int, default=DEFAULTS["threads"], help="torch.set_num_threads for the perf suite. Default: %(default)s")
    g.addoption(
        "--perf-inject-slowdown",
        metavar="FACTOR",
        default=None,
        help=f"Self-check: make every QINS forward FACTOR times slower (busy-wait). Same as env {INJECT_ENV}=FACTOR.",
    )
    g.addoption("--perf-ratio-tol", type=float, default=DEFAULTS["ratio_tol"], help="Allowed rise of a layer ratio vs its baseline. Default: %(default)s")
    g.addoption(
        "--perf-codec-tol",
        type=float,
        default=DEFAULTS["codec_tol"],
        help="Allowed rise of a decode/encode-dominated ratio (decode, encode, memory-saving forward at batch 1 "
        "and memory-saving generation vs FP32). Default: %(default)s",
    )
    g.addoption("--perf-ppl-windows", type=int, default=98, help="perf/test_perplexity.py: windows of 512 scored tokens of the news text (98: 50,176 tokens). Default: %(default)s")
    g.addoption("--perf-e2e-tol", type=float, default=DEFAULTS["e2e_tol"], help="Allowed rise of an end-to-end ratio vs FP32. Default: %(default)s")
    g.addoption(
        "--perf-cache-gain-tol",
        type=float,
        default=DEFAULTS["cache_gain_tol"],
        help="Allowed loss of the KV-cache gain (no-cache/cache time - 1) vs the baseline. Default: %(default)s",
    )
    g.addoption("--perf-memory-tol", type=float, default=DEFAULTS["memory_tol"], help="Allowed rise of memory figures. Default: %(default)s")
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
        choices=list(G.TARGET_CHOICES),
        default="report",
        help="The absolute speed targets (perf/test_kernels.py, perf/test_e2e.py): 'report' measures them and states "
        "each met or missed in the summary; 'on' also fails a test whose target is missed (after its re-measure). "
        "Memory targets are asserted always. Default: %(default)s",
    )
    g.addoption(
        "--perf-flat-storage",
        action="store_true",
        default=False,
        help="Do not add the per-CPU sub-directory to --benchmark-storage (baselines of every CPU then share one folder).",
    )
    g.addoption("--perf-sqnr-tol-db", type=float, default=DEFAULTS["sqnr_tol_db"], help="Accuracy gate: allowed drop of an sqnr_db figure (dB). Default: %(default)s")
    g.addoption("--perf-ppl-tol-pct", type=float, default=DEFAULTS["ppl_tol_pct"], help="Accuracy gate: allowed rise of a ppl_increase_pct figure (perplexity increase over fp32, percentage points). Default: %(default)s")
    g.addoption("--perf-cosine-tol", type=float, default=DEFAULTS["cosine_tol"], help="Accuracy gate: allowed drop of a cosine figure (absolute). Default: %(default)s")
    g.addoption("--perf-plot", metavar="PNG", default=None, help="Write a chart of this run vs the baseline to PNG.")
    g.addoption("--perf-table", metavar="MD", default=None, help="Write the figures of this run as a markdown table.")


def _storage_dir(config) -> Optional[Path]:
    uri = str(config.getoption("benchmark_storage"))
    if "://" not in uri:
        return Path(uri)
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None  # elasticsearch: not validated here


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) pytest_configure, which reads these options.
    state = PerfState(config)
    config.stash[_STATE_KEY] = state
    state.threads = config.getoption("perf_threads")
    state.targets = config.getoption("perf_targets")
    saving = bool(config.getoption("benchmark_save") or config.getoption("benchmark_autosave"))
    budget = config.getoption("perf_budget")
    state.budget = budget if budget is not None else (2.0 if saving else 1.0)
    state.tol = {
        "ratio": config.getoption("perf_ratio_tol"),
        "codec": config.getoption("perf_codec_tol"),
        "e2e": config.getoption("perf_e2e_tol"),
        "cache_gain": config.getoption("perf_cache_gain_tol"),
        "memory": config.getoption("perf_memory_tol"),
    }
    try:
        opt = config.getoption("perf_inject_slowdown")
        state.factor = parse_factor(opt if opt is not None else os.environ.get(INJECT_ENV))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if state.factor != 1.0 and (config.getoption("benchmark_save") or config.getoption("benchmark_autosave")):
        raise pytest.UsageError(
            f"QINS perf gate: refusing to save a baseline with an injected slowdown ({state.factor}x); unset {INJECT_ENV} / --perf-inject-slowdown."
        )
    config.option.benchmark_disable_gc = True
    state.clock = _choose_clock(config)
    if state.clock == "cpu" and config.getoption("benchmark_timer") == "time.perf_counter":
        config.option.benchmark_timer = "time.thread_time"
    # torch.compile's internals trip this deprecation on every compile; it is not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

    storage = _storage_dir(config)
    state.cpu = _this_cpu()
    state.cpu_key, state.cpu_label = G.cpu_key(state.cpu), G.cpu_label(state.cpu)
    if storage is not None and not config.getoption("perf_flat_storage"):
        # per-CPU baselines: pytest-benchmark's file storage rooted at <storage>/<cpu key>, so that
        # --benchmark-save lands in <storage>/<cpu key>/<machine id>/NNNN_<name>.json
        config.option.benchmark_storage = f"file://{storage / state.cpu_key}"
    compare = config.getoption("benchmark_compare")
    if compare and not _benchmarks_off(config):
        if storage is not None:
            _choose_mode(config, state, storage, compare)
        if state.mode == "stored":
            backstop = config.getoption("perf_backstop")
            if backstop and backstop != "off" and not config.getoption("benchmark_compare_fail"):
                from pytest_benchmark.utils import parse_compare_fail

                try:
                    config.option.benchmark_compare_fail = [parse_compare_fail(backstop)]
                except Exception as exc:  # argparse.ArgumentTypeError
                    raise pytest.UsageError(f"--perf-backstop: {exc}") from None


_CPU_CACHE: dict = {}


def _this_cpu() -> dict:
    """py-cpuinfo's record of this machine's CPU (what pytest-benchmark stores as machine_info["cpu"])."""
    if "cpu" not in _CPU_CACHE:
        import cpuinfo

        _CPU_CACHE["cpu"] = cpuinfo.get_cpu_info()
    return _CPU_CACHE["cpu"]


def _choose_mode(config, state: PerfState, storage: Path, compare) -> None:
    """Stored baseline for this CPU, or same-job A/B against a baseline's revision (perf/README.md, "Modes")."""
    from pytest_benchmark.utils import get_machine_id

    from perf import ab

    machine_id = get_machine_id()
    want = config.getoption("perf_mode")
    cpu_dir = storage if config.getoption("perf_flat_storage") else storage / state.cpu_key
    own_error = None
    try:
        base = G.load_baseline(G.locate_baseline(cpu_dir, machine_id, compare))
    except G.BaselineError as exc:
        own_error, base = exc, None
    if base is None:
        # no baseline for this CPU: the newest baseline of this platform/Python, any CPU, for A/B
        if compare is not True or want == "stored":
            raise pytest.UsageError(_with_ab_hint(str(own_error), state)) from None
        candidates = []
        for path in G.all_saved_runs(storage, machine_id):
            try:
                candidates.append(G.load_baseline(path))
            except G.BaselineError:
                continue
        if not candidates:
            raise pytest.UsageError(_with_ab_hint(str(own_error), state)) from None
        base = max(candidates, key=lambda b: (b.datetime, b.path.name))
    base_cpu = G.baseline_cpu(base.machine_info)
    state.accuracy_baseline = base  # accuracy is the same on any CPU: gated against any baseline
    if G.same_cpu(base_cpu, state.cpu) and want != "ab":
        state.mode = "stored"
        state.baseline = base
        state.mode_line = f"stored baseline for {state.cpu_label}: {base.label} (saved {base.datetime})"
        return
    if want == "stored":
        raise pytest.UsageError(
            f"QINS perf gate: --perf-mode=stored, but baseline {base.label} was measured on {G.cpu_label(base_cpu)}, "
            f"not on this CPU, {state.cpu_label}. Its speed figures are never used here.\n"
            f"Create a baseline for this CPU with:\n    {G.SAVE_COMMAND}\n(then commit it), or use --perf-mode=auto (A/B)."
        )
    try:
        rev = ab.resolve_revision(config.rootpath, (base.commit_info or {}).get("id"), base.label)
    except ab.RevisionError as exc:
        raise pytest.UsageError(
            f"QINS perf gate: no baseline for this CPU ({state.cpu_label}); the newest baseline, {base.label}, "
            f"was measured on {G.cpu_label(base_cpu)}, so its revision would be measured here (A/B).\n{exc}"
        ) from None
    state.mode = "ab"
    state.ab_base = base
    state.ab_rev = rev
    why = "--perf-mode=ab" if G.same_cpu(base_cpu, state.cpu) else f"no baseline for {state.cpu_label}; {base.label} is from {G.cpu_label(base_cpu)}"
    dirty = " (that baseline was saved from a dirty tree: the revision may not be exactly what it measured)" if (base.commit_info or {}).get("dirty") else ""
    state.mode_line = f"A/B against {rev[:12]} measured here ({why}){dirty}"
    # nothing stored is compared in A/B: no pytest-benchmark comparison, no absolute backstop
    config.option.benchmark_compare = None
    config.option.benchmark_compare_fail = None


def _with_ab_hint(msg: str, state: PerfState) -> str:
    return f"{msg}\n(This CPU: {state.cpu_label}; its baselines live under .benchmarks/{state.cpu_key}/.)"


def _choose_clock(config) -> str:
    choice = config.getoption("perf_clock")
    if choice == "auto":
        import torch

        choice = "wall" if torch.cuda.is_available() else "cpu"
    from perf import timing

    timing.use_clock(choice)
    return choice


def _benchmarks_off(config) -> bool:
    return bool(
        config.getoption("benchmark_skip")
        or (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))
    )


def pytest_report_header(config):
    state = _state(config)
    return [
        f"qins-perf: threads={state.threads} clock={state.clock} tolerances={state.tol} budget={state.budget}"
        + (f" INJECTED SLOWDOWN x{state.factor}" if state.factor != 1.0 else ""),
        f"qins-perf: CPU {state.cpu_label} (baselines under <storage>/{state.cpu_key}/)",
        f"qins-perf: mode: {state.mode_line}",
    ]


# --------------------------------------------------------------------------------------------
# Same-job A/B (mode "ab"): old revision before and after this session's run
# --------------------------------------------------------------------------------------------


def _ab_options(config, state) -> list:
    """This run's measurement settings, for the old side of an A/B (both sides measure alike)."""
    out = [f"--perf-clock={state.clock}", f"--perf-threads={state.threads}"]
    if config.getoption("perf_budget") is not None:
        out.append(f"--perf-budget={config.getoption('perf_budget')}")
    return out


def _new_side_options(config, state) -> list:
    """The options of a run of this revision's suite in a subprocess (confirmations): this run's
    measurement options and its injected slowdown (which slows this revision only)."""
    return _ab_options(config, state) + ([f"--perf-inject-slowdown={state.factor}"] if state.factor != 1.0 else [])


def _ab_selection(config) -> list:
    out = []
    root = config.rootpath
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        p = Path(path)
        p = p if p.is_absolute() else (config.invocation_params.dir / p)
        try:
            rel = p.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        out.append(str(rel) + sep + rest)
    return out


def _say(config, line: str, **markup) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line, **markup)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    """A/B round 1, old side first: export the old revision and run its suite before this one."""
    config = session.config
    state = _state(config)
    if state.mode != "ab" or config.getoption("collectonly"):
        return
    from perf import ab

    _say(config, f"qins-perf: A/B: measuring revision {state.ab_rev[:12]} on this machine (round 1 of 2, old side first) ...")
    try:
        state.ab_old = ab.OldSide(config.rootpath, state.ab_rev, _ab_selection(config), config.getoption("keyword") or None,
                                  config.getoption("markexpr") or None, _ab_options(config, state))
        if state.ab_old.dropped_options:
            _say(config, f"qins-perf: A/B: revision {state.ab_rev[:12]} does not know {' '.join(state.ab_old.dropped_options)}; "
                         "it measures with its own defaults there", red=True)
        old1 = state.ab_old.run(1)
    except ab.RevisionError as exc:
        state.ab_error = str(exc)
        _say(config, str(exc), red=True)
        return
    _say(config, f"qins-perf: A/B: old revision measured in {state.ab_old.seconds[-1]:.0f} s ({len(old1)} benchmarks, "
                 f"{' '.join(state.ab_old.options) or 'its defaults'}); now this revision")
    # this session's figures are checked against round 1 as they are measured, so that an excess is
    # re-measured at once (the better of the two measurements is this revision's figure); the verdict
    # comes at the end, after round 2
    state.baseline = G.Baseline(path=Path(f"A-B round 1: {state.ab_rev[:12]} measured here"), entries=old1,
                                commit_info={"id": state.ab_rev})


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A/B round 2, this revision first: run the old suite again, then pair and judge."""
    config = session.config
    state = _state(config)
    if state.mode != "ab" or state.ab_old is None or state.ab_error:
        if state.mode == "ab" and state.ab_error:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if state.ab_old is not None:
            state.ab_old.cleanup()
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED or not state.records:
        state.ab_old.cleanup()
        return
    from perf import ab

    _say(config, "")
    _say(config, f"qins-perf: A/B: measuring revision {state.ab_rev[:12]} again (round 2 of 2, this revision went first) ...")
    try:
        state.ab_old.run(2)
        state.ab_seconds = list(state.ab_old.seconds)
        new = {name: _ab_new_figures(rec["extra_info"]) for name, rec in state.records.items()}
        state.ab_outcomes = G.ab_decide([new, new], state.ab_old.runs)
        if config.getoption("perf_ab_confirm") == "on":
            _confirm_ab_mode(config, state)
    except ab.RevisionError as exc:
        state.ab_error = str(exc)
    finally:
        state.ab_old.cleanup()
    if state.ab_error or any(o.failed for o in state.ab_outcomes):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _confirm_ab_mode(config, state: PerfState) -> None:
    """A/B-mode regressions judged again in fresh processes of both sides (``perf.ab.confirm``,
    CONFIRM_ROUNDS rounds), a benchmark at a time, at most MAX_AB_CONFIRMATIONS; stops at the first
    confirmed one (the run fails anyway). Unconfirmed ones keep their verdict, with the reason."""
    from perf import ab

    tests = list(dict.fromkeys(o.test for o in state.ab_outcomes if o.failed))
    options = _new_side_options(config, state)
    why = ""
    for i, test in enumerate(tests):
        if not why and i >= MAX_AB_CONFIRMATIONS:
            why = f"{MAX_AB_CONFIRMATIONS} confirmations already spent in this run"
        if why:
            for o in state.ab_outcomes:
                if o.failed and o.test == test:
                    o.note = f"not confirmed in fresh processes: {why}"
            continue
        _say(config, f"qins-perf: {test}: regressed in the A/B; confirming in fresh processes of both revisions "
                     f"({ab.CONFIRM_ROUNDS} rounds) ...")
        measured = ab.confirm(state.ab_old, config.rootpath, test, options)
        G.apply_fresh_confirmation(state.ab_outcomes, test, G.ab_decide(measured.new_runs, measured.old_runs), state.ab_rev)
        if any(o.failed and o.test == test for o in state.ab_outcomes):
            why = "a regression is already confirmed in this run (the run fails; no more A/B spent)"


def _ab_new_figures(info: dict) -> dict:
    """This revision's figures for A/B: the decisive (better) value where a figure was re-measured."""
    out = dict(info)
    out.update(info.get("qins_ab_decisive") or {})
    return out


# --------------------------------------------------------------------------------------------
# Accuracy gate (any baseline: accuracy is the same on every CPU)
# --------------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if bench is None:
        return result
    info = getattr(bench, "extra_info", None) or {}
    if G.ACCURACY_KEY not in info:
        return result
    state = _state(item.config)
    base = state.accuracy_baseline
    outcomes = G.accuracy_decide(
        bench.fullname,
        info.get(G.ACCURACY_KEY),
        base.entry(bench.fullname) if base is not None else None,
        base.label if base is not None else None,
        sqnr_tol_db=item.config.getoption("perf_sqnr_tol_db"),
        cosine_tol=item.config.getoption("perf_cosine_tol"),
        ppl_tol_pct=item.config.getoption("perf_ppl_tol_pct"),
    )
    state.accuracy_outcomes.extend(outcomes)
    bad = [o for o in outcomes if o.failed]
    if bad:
        pytest.fail("\n".join(o.message() for o in bad), pytrace=False)
    return result


# --------------------------------------------------------------------------------------------
# pytest-benchmark hooks
# --------------------------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config, machine_info):
    from importlib.metadata import version

    state = _state(config)
    machine_info["torch"] = version("torch")  # == torch.__version__, without importing torch
    machine_info["qins_perf_threads"] = state.threads
    machine_info["qins_perf_clock"] = state.clock
    machine_info["qins_cpu_key"] = state.cpu_key  # informative; "same CPU" is decided from machine_info["cpu"]
    machine_info["qins_cpu_label"] = state.cpu_label


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = _state(config)
    output_json["qins_perf"] = {
        "threads": state.threads,
        "clock": state.clock,
        "budget": state.budget,
        "tolerances": state.tol,
        "inject_slowdown": state.factor,
        "baseline": state.baseline.label if state.baseline else None,
        "mode": state.mode,
        "mode_line": state.mode_line,
        "cpu_key": state.cpu_key,
        "accuracy": [
            {"test": o.test, "figure": o.figure, "kind": o.kind, "value": o.value, "baseline": o.baseline, "status": o.status}
            for o in state.accuracy_outcomes
        ],
        "gate": [
            {
                "test": o.test,
                "figure": o.figure,
                "value": o.value,
                "confirmation": o.confirmation,
                "baseline": o.baseline,
                "status": o.status,
            }
            for o in state.outcomes
        ],
    }


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    # pytest-benchmark already warns about any machine_info difference (the CPU MHz alone varies);
    # the two that change what a ratio means get a clearer note here.
    saved = compared_benchmark.get("machine_info", {})
    for key in ("torch", "qins_perf_threads", "qins_perf_clock"):
        if key in saved and saved.get(key) != machine_info.get(key):
            benchmarksession.logger.warning(
                f"QINS perf: baseline was measured with {key}={saved.get(key)!r}, this run has {machine_info.get(key)!r}; ratios may shift."
            )


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def perf_state(request) -> PerfState:
    return _state(request.config)


@pytest.fixture(scope="session")
def device():
    """The device the suite runs on: CUDA when available, else CPU. Timed callables sync on CUDA."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def _perf_torch_settings(perf_state):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(perf_state.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (or parallel work already ran); harmless
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _perf_gc_between_tests():
    gc.collect()
    yield
    gc.collect()


@pytest.fixture(scope="session")
def inject_factor(perf_state) -> float:
    """The injected slowdown factor (1.0 = none). See ``--perf-inject-slowdown``."""
    return perf_state.factor


class GateHandle:
    """What a test uses: ``check`` gated figures, ``record`` plain ones, ``lookup`` earlier ones."""

    def __init__(self, state: PerfState, request):
        self.state = state
        self.request = request

    @property
    def tol(self) -> dict:
        return self.state.tol

    @property
    def budget(self) -> float:
        return self.state.budget

    def lookup(self, key: str) -> Optional[dict]:
        return self.state.by_key.get(key)

    def record(self, benchmark, figures: Mapping[str, object], key: Optional[str] = None) -> None:
        info = benchmark.extra_info
        info.update(figures)
        if self.state.factor != 1.0:
            info["inject_slowdown"] = self.state.factor
        if key:
            info["key"] = key
            self.state.by_key[key] = info
        stats = getattr(benchmark, "stats", None)
        median = None
        if stats is not None and stats.stats.data:
            median = stats.stats.median
        self.state.records[benchmark.fullname] = {
            "group": benchmark.group,
            "name": benchmark.name,
            "extra_info": info,
            "median": median,
        }

    def speed_target(self, benchmark, kernel: str, target: str, missed: Optional[str]) -> None:
        """An absolute speed target of ``benchmark``, run on ``kernel``: ``target`` says what it is,
        ``missed`` is the message when it was missed after its re-measure, else None. Recorded for the
        summary (met or missed) and ``extra_info``; a miss fails the test only under ``--perf-targets=on``."""
        status = "met" if missed is None else "missed"
        self.state.target_results.append((benchmark.fullname, kernel, status, target if missed is None else missed))
        benchmark.extra_info.setdefault("speed_targets", []).append({"target": target, "status": status,
                                                                       "kernel": kernel, "missed": missed})
        if missed is not None and G.speed_targets_asserted(self.state.targets):
            pytest.fail(missed, pytrace=False)

    def accuracy_target(self, benchmark, what: str, met: bool) -> None:
        """An absolute accuracy target of ``benchmark`` (e.g. a perplexity increase against int8's),
        stated met or missed in the summary and ``extra_info``; a miss fails the test only under
        ``--perf-targets=on``. Regressions against the baseline are gated separately (accuracy gate)."""
        status = "met" if met else "missed"
        self.state.accuracy_target_results.append((benchmark.fullname, status, what))
        benchmark.extra_info.setdefault("accuracy_targets", []).append({"target": what, "status": status})
        if not met and G.speed_targets_asserted(self.state.targets):
            pytest.fail(f"accuracy target missed: {what}", pytrace=False)

    def check(
        self,
        benchmark,
        figures: Mapping[str, float],
        rules: Mapping[str, G.Rule],
        remeasure: Optional[Callable[[], Mapping[str, float]]] = None,
        key: Optional[str] = None,
    ) -> list[G.Outcome]:
        """Record ``figures``, gate those named in ``rules``; fail the test on a confirmed regression."""
        self.record(benchmark, figures, key=key)
        if benchmark.disabled:
            return []
        benchmark.extra_info[G.GATE_KEY] = sorted(rules)
        benchmark.extra_info[G.RULES_KEY] = {k: G.rule_to_json(r) for k, r in rules.items()}
        base = self.state.baseline
        entry = base.entry(benchmark.fullname) if base is not None else None
        outcomes = G.decide(
            benchmark.fullname,
            {k: float(figures[k]) for k in rules},
            rules,
            entry,
            base.label if base is not None else None,
            remeasure,
        )
        self.state.outcomes.extend(outcomes)
        limits = {
            o.figure: {"baseline": o.baseline, "limit": o.limit, "worse": o.rule.worse, "status": o.status}
            for o in outcomes
            if o.baseline is not None
        }
        if limits:
            benchmark.extra_info["qins_gate_limits"] = limits
        confirmations = {o.figure: o.confirmation for o in outcomes if o.confirmation is not None}
        if confirmations:
            benchmark.extra_info["confirmation"] = confirmations
        if self.state.mode == "ab":
            # judged at the end of the session, paired with both rounds of the old revision
            benchmark.extra_info["qins_ab_decisive"] = {o.figure: o.decisive for o in outcomes if o.confirmation is not None}
            return outcomes
        failed = [o for o in outcomes if o.failed]
        if failed and remeasure is not None and self.state.mode == "stored" and self.request.config.getoption("perf_ab_confirm") == "on":
            failed = _confirm_by_ab(self.state, self.request, benchmark, failed)
        if failed:
            pytest.fail("\n".join(o.message() for o in failed), pytrace=False)
        return outcomes


#: A/B confirmations per session (each runs the old suite's test twice: ~10-60 s); a run with more
#: stored-baseline failures than this fails on the rest as stored-baseline failures.
MAX_AB_CONFIRMATIONS = 5


def _confirm_by_ab(state: PerfState, request, benchmark, failed: list) -> list:
    """A stored-baseline failure measured again against the baseline's revision, here, like for like
    (perf/README.md, "A/B confirmation"); returns the figures that still fail. Not run once a
    regression has been confirmed (the run fails anyway) or after MAX_AB_CONFIRMATIONS."""
    from perf import ab

    rev = str((state.baseline.commit_info or {}).get("id") or "") if state.baseline is not None else ""
    config = request.config
    why = state.confirm_error or ("" if rev else "the baseline records no git revision")
    if not why and state.confirm_regressed:
        why = "a regression is already confirmed by A/B in this run (the run fails; no more A/B spent)"
    elif not why and state.confirm_count >= MAX_AB_CONFIRMATIONS:
        why = f"{MAX_AB_CONFIRMATIONS} A/B confirmations already spent in this run"
    if why:
        for o in failed:
            o.note = f"not confirmed by A/B: {why}"
        return failed
    state.confirm_count += 1
    capture = config.pluginmanager.getplugin("capturemanager")  # shown while the test runs (it takes a while)
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        _say(config, f"\nqins-perf: {benchmark.fullname}: beyond the stored baseline twice; A/B against {rev[:12]} measured here ...")
    try:
        if state.confirm_old is None:
            state.confirm_old = ab.OldSide(config.rootpath, ab.resolve_revision(config.rootpath, rev, state.baseline.label),
                                           [request.node.nodeid.split("::")[0]], None, None, _ab_options(config, state))
        options = _new_side_options(config, state)
        measured = ab.confirm(state.confirm_old, config.rootpath, request.node.nodeid, options)
    except ab.RevisionError as exc:
        state.confirm_error = str(exc).splitlines()[0]
        for o in failed:
            o.note = f"not confirmed by A/B: {state.confirm_error}"
        return failed
    still = G.apply_ab_confirmation(failed, G.ab_decide(measured.new_runs, measured.old_runs), rev)
    state.confirm_regressed = state.confirm_regressed or bool(still)
    return still


def _confirm_backstop(config, state: PerfState) -> tuple[bool, list]:
    """The absolute backstop's failures measured again as a same-work A/B against the baseline's
    revision, here (perf/README.md, "Absolute backstop"): each failing benchmark's minimum time,
    this revision against the old, two rounds alternating which goes first. Returns ``(fail the
    run?, report lines)``: the run fails when A/B confirms one failure, or when it cannot be run
    (no revision, another kind of backstop, too many failures, ``--perf-ab-confirm=off``)."""
    from perf import ab

    bs = getattr(config, "_benchmarksession", None)
    regressions = list(getattr(bs, "performance_regressions", None) or [])
    names = {name.rsplit(" (", 1)[0] for name, _ in regressions}
    nodes = sorted({b.fullname for b in getattr(bs, "benchmarks", []) if names & {b.name, b.name[5:], b.fullname}})
    checks = config.getoption("benchmark_compare_fail") or []
    rev = str((state.baseline.commit_info or {}).get("id") or "") if state.baseline is not None else ""
    why = ""
    if config.getoption("perf_ab_confirm") != "on":
        why = "--perf-ab-confirm=off"
    elif not rev:
        why = "the baseline records no git revision"
    elif state.confirm_error:
        why = state.confirm_error
    elif not all(type(c).__name__ == "PercentageRegressionCheck" and c.field == "min" for c in checks):
        why = "only a min:N% backstop is confirmed by A/B"
    elif not nodes:
        why = "the failing benchmarks are not among this run's"
    elif len(nodes) > MAX_AB_CONFIRMATIONS:
        why = f"{len(nodes)} benchmarks failed it, more than the {MAX_AB_CONFIRMATIONS} confirmed by A/B"
    if why:
        return True, [f"not confirmed by A/B: {why}"]
    factor = 1.0 + min(float(c.threshold) for c in checks) / 100.0
    measure = _ab_options(config, state)
    options = _new_side_options(config, state)
    _say(config, f"\nqins-perf: absolute backstop tripped by {len(nodes)} benchmark(s); A/B against {rev[:12]} measured here ...")
    lines, confirmed = [], False
    try:
        if state.confirm_old is None:
            state.confirm_old = ab.OldSide(config.rootpath, ab.resolve_revision(config.rootpath, rev, state.baseline.label),
                                           [nodes[0].split("::")[0]], None, None, measure)
        for node in nodes:
            new_mins, old_mins = ab.confirm_backstop(state.confirm_old, config.rootpath, node, options)
            bad, how = G.backstop_decide(new_mins, old_mins, factor)
            confirmed = confirmed or bad
            lines.append(f"{node}: {'CONFIRMED' if bad else 'refuted'} by A/B against {rev[:12]} measured here: {how}")
    except ab.RevisionError as exc:
        return True, lines + [f"not confirmed by A/B: {str(exc).splitlines()[0]}"]
    return confirmed, lines


@pytest.fixture
def perf_gate(perf_state, request) -> GateHandle:
    return GateHandle(perf_state, request)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from pytest_benchmark.session import PerformanceRegression

    state = _state(config)
    try:
        result = yield
    except PerformanceRegression:
        # pytest-benchmark's absolute backstop (--benchmark-compare-fail) fired; it has already
        # printed which benchmark and field. Report it as a failed run, without a traceback.
        fail = config.getoption("benchmark_compare_fail") or []
        exprs = ", ".join(f"{c.field}:{c.threshold}{'%' if 'Percentage' in type(c).__name__ else 's'}" for c in fail)
        where = state.baseline.label if state.baseline is not None else "the compared run"
        result = None
        confirmed, state.backstop_ab = _confirm_backstop(config, state)
        if confirmed:
            state.backstop_failed = (
                f"absolute backstop --benchmark-compare-fail={exprs} failed against {where} "
                f"(which benchmark and by how much: 'Performance has regressed' above)"
            )
            session = getattr(terminalreporter, "_session", None)
            if session is not None:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        else:
            state.backstop_refuted = (
                f"absolute backstop --benchmark-compare-fail={exprs} tripped against {where}, but the same-work "
                f"A/B refuted it (the machine was slower, not the code):"
            )
    _report(terminalreporter, state)
    if state.confirm_old is not None:  # not before: the backstop's confirmation above reuses its export
        state.confirm_old.cleanup()
    return result


def _report(tr, state: PerfState) -> None:
    if not state.records and not state.outcomes and not state.ab_error and not state.target_results \
            and not state.accuracy_target_results:
        return
    tr.section("QINS perf gate", sep="-", bold=True)
    if state.factor != 1.0:
        tr.write_line(f"INJECTED SLOWDOWN: every QINS forward x{state.factor} ({INJECT_ENV} / --perf-inject-slowdown)", yellow=True)
    tr.write_line(f"CPU: {state.cpu_label}")
    tr.write_line(f"mode: {state.mode_line}")
    if state.mode == "ab":
        _report_ab(tr, state)
    compared = [o for o in state.outcomes if o.status != "not-compared"] if state.mode == "stored" else []
    if compared:
        tr.write_line(G.render_table(G.outcome_table(compared)))
        bad = [o for o in compared if o.failed]
        unconfirmed = [o for o in compared if o.status == "unconfirmed"]
        if unconfirmed:
            tr.write_line(f"{len(unconfirmed)} figure(s) exceeded once but passed the confirmation re-measure.")
        refuted = [o for o in compared if o.status == "refuted"]
        if refuted:
            tr.write_line(f"{len(refuted)} figure(s) beyond the stored baseline twice passed the A/B confirmation "
                          "(this revision against the baseline's, measured here):", yellow=True)
            for o in refuted:
                tr.write_line("  " + o.message(), yellow=True)
        if bad:
            tr.write_line(f"GATE FAILED: {len(bad)} figure(s) regressed:", red=True, bold=True)
            for o in bad:
                tr.write_line("  " + o.message(), red=True)
        else:
            tr.write_line(f"gate passed: {len(compared)} figure(s) within limits.", green=True)
    _report_accuracy(tr, state)
    _report_targets(tr, state)
    if state.backstop_failed:
        tr.write_line("GATE FAILED: " + state.backstop_failed, red=True, bold=True)
    elif state.backstop_refuted:
        tr.write_line(state.backstop_refuted, yellow=True)
    for line in state.backstop_ab:
        tr.write_line("  " + line, red=bool(state.backstop_failed), yellow=not state.backstop_failed)
    rows = figures_rows(state)
    if rows:
        tr.write_line("")
        tr.write_line("figures of this run:")
        tr.write_line(G.render_table(rows))
    cfg = state.config
    table_path = cfg.getoption("perf_table")
    if table_path and rows:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(G.render_table(rows, markdown=True) + "\n", encoding="utf8")
        tr.write_line(f"wrote figures table: {table_path}")
    plot_path = cfg.getoption("perf_plot")
    if plot_path and state.records:
        try:
            from perf.plot import make_chart

            current = {k: v["extra_info"] for k, v in state.records.items()}
            base = state.baseline.entries if state.baseline is not None else None
            make_chart(current, base, plot_path, baseline_label=state.baseline.label if state.baseline else None)
            tr.write_line(f"wrote chart: {plot_path}")
        except Exception as exc:  # a chart must never turn a passing gate into a crash
            tr.write_line(f"could not write chart {plot_path}: {type(exc).__name__}: {exc}", red=True)


def _report_targets(tr, state: PerfState) -> None:
    """State every absolute target judged in this run, met or missed: speed (with its kernel path)
    and accuracy."""
    if state.accuracy_target_results:
        missed = sum(r[1] == "missed" for r in state.accuracy_target_results)
        tr.write_line(f"accuracy targets: {len(state.accuracy_target_results) - missed} met, {missed} missed "
                      f"({'asserted' if G.speed_targets_asserted(state.targets) else 'reported, not asserted'}):",
                      yellow=bool(missed), green=not missed)
        for test, status, what in state.accuracy_target_results:
            tr.write_line(f"  {status.upper():6} {test}: {what}", yellow=status == "missed")
    if not state.target_results:
        return
    missed = [r for r in state.target_results if r[2] == "missed"]
    kernels = ", ".join(sorted({r[1] for r in state.target_results}))
    how = "asserted: those tests failed" if G.speed_targets_asserted(state.targets) else \
        "reported, not asserted; --perf-targets=on asserts them"
    tr.write_line(f"speed targets on {state.cpu_label or 'this CPU'} ({kernels}): "
                  f"{len(state.target_results) - len(missed)} met, {len(missed)} missed ({how}):",
                  yellow=bool(missed), green=not missed)
    for test, kernel, status, what in state.target_results:
        tr.write_line(f"  {status.upper():6} {test}: {what} [{kernel}]", yellow=status == "missed")


def _report_ab(tr, state: PerfState) -> None:
    if state.ab_error:
        tr.write_line("GATE FAILED: A/B could not be completed: " + state.ab_error, red=True, bold=True)
        return
    if not state.ab_outcomes:
        return
    secs = " + ".join(f"{s:.0f} s" for s in state.ab_seconds)
    tr.write_line(f"A/B rounds: old, new | new, old (old revision's suite took {secs}); speed figures of the stored "
                  f"baseline {state.ab_base.label if state.ab_base else ''} are not used")
    tr.write_line(G.render_table(G.ab_table(state.ab_outcomes)))
    new = [o for o in state.ab_outcomes if o.status == "new"]
    if new:
        tr.write_line(f"{len(new)} figure(s) new in this revision (the old one does not measure them): reported, not gated.")
    bad = [o for o in state.ab_outcomes if o.failed]
    judged = [o for o in state.ab_outcomes if o.status in ("pass", "regressed", "refuted")]
    refuted = [o for o in state.ab_outcomes if o.status == "refuted"]
    if refuted:
        tr.write_line(f"{len(refuted)} figure(s) regressed in the A/B's rounds and were refuted by its confirmation "
                      "in fresh processes of both revisions:", yellow=True)
        for o in refuted:
            tr.write_line("  " + o.message(state.ab_rev), yellow=True)
    if bad:
        tr.write_line(f"GATE FAILED (A/B against {state.ab_rev[:12]} measured here): {len(bad)} figure(s) regressed:", red=True, bold=True)
        for o in bad:
            tr.write_line("  " + o.message(state.ab_rev), red=True)
    else:
        tr.write_line(f"gate passed (A/B against {state.ab_rev[:12]} measured here): {len(judged)} figure(s) within limits.", green=True)


def _report_accuracy(tr, state: PerfState) -> None:
    outs = state.accuracy_outcomes
    if not outs:
        return
    src = state.accuracy_baseline.label if state.accuracy_baseline else "none"
    tr.write_line(f"accuracy gate (against {src}; accuracy is CPU-independent, so any baseline serves):")
    for o in outs:
        tr.write_line("  " + o.message(), red=o.failed)
    bad = [o for o in outs if o.failed]
    if bad:
        tr.write_line(f"ACCURACY GATE FAILED: {len(bad)} figure(s).", red=True, bold=True)


#: (extra_info key, column title, format) of the figures table.
FIGURE_COLUMNS = [
    ("time_s", "median s", "{:.4g}"),
    ("ratio_vs_linear", "x nn.Linear", "{:.3g}"),
    ("ratio_same_kind", "x same-kind ref", "{:.3g}"),
    ("gbps", "GB/s", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:.4g}"),
    ("ratio_vs_fp32", "x FP32 time", "{:.3g}"),
    ("cache_speedup", "no-cache/cache", "{:.3g}"),
    ("model_mib", "model MiB", "{:.4g}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.4g}"),
    ("peak_generate_delta_mib", "gen. peak +MiB", "{:.4g}"),
]


def figures_rows(state: PerfState) -> list[list[str]]:
    rows = [["group", "benchmark"] + [c[1] for c in FIGURE_COLUMNS]]
    for rec in state.records.values():
        info = rec["extra_info"]
        row = [str(rec["group"] or ""), rec["name"]]
        for key, _title, f in FIGURE_COLUMNS:
            v = info.get(key, rec["median"] if key == "time_s" else None)
            row.append(f.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "")
        rows.append(row)
    return rows if len(rows) > 1 else []
