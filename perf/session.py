"""Session setup of the perf gate: options into state, the CPU's identity, the comparison mode.

Modes (perf/README.md, "Modes"): ``none`` without ``--benchmark-compare``; ``stored`` when a
baseline measured on this CPU exists; ``ab`` otherwise (or with ``--perf-mode=ab``): the newest
baseline's revision is measured on this machine, before and after this run (:mod:`perf.ab_session`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from perf.baseline import BaselineError, all_saved_runs, load_baseline, locate_baseline
from perf.cpu import baseline_cpu, cpu_key, cpu_label, same_cpu, this_cpu
from perf.gate import INJECT_ENV, SAVE_COMMAND, parse_factor
from perf.options import storage_dir
from perf.state import STATE_KEY, PerfState


def configure(config: pytest.Config) -> PerfState:
    """Read the options into a new :class:`PerfState` (stashed on ``config``), identify the CPU,
    choose the mode and set pytest-benchmark's options to match.

    Must run before pytest-benchmark's own (trylast) ``pytest_configure``, which reads those
    options. Raises ``pytest.UsageError`` (a message, no traceback) on a bad option or baseline.
    """
    state = PerfState(config)
    config.stash[STATE_KEY] = state
    state.settings.threads = config.getoption("perf_threads")
    state.settings.targets = config.getoption("perf_targets")
    saving = bool(config.getoption("benchmark_save") or config.getoption("benchmark_autosave"))
    budget = config.getoption("perf_budget")
    state.settings.budget = budget if budget is not None else (2.0 if saving else 1.0)
    state.settings.tol = {
        "ratio": config.getoption("perf_ratio_tol"),
        "codec": config.getoption("perf_codec_tol"),
        "e2e": config.getoption("perf_e2e_tol"),
        "cache_gain": config.getoption("perf_cache_gain_tol"),
        "memory": config.getoption("perf_memory_tol"),
    }
    try:
        opt = config.getoption("perf_inject_slowdown")
        state.settings.factor = parse_factor(opt if opt is not None else os.environ.get(INJECT_ENV))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if state.settings.factor != 1.0 and (config.getoption("benchmark_save") or config.getoption("benchmark_autosave")):
        raise pytest.UsageError(
            f"QINS perf gate: refusing to save a baseline with an injected slowdown ({state.settings.factor}x); unset "
            f"{INJECT_ENV} / --perf-inject-slowdown."
        )
    config.option.benchmark_disable_gc = True
    state.settings.clock = choose_clock(config)
    if state.settings.clock == "cpu" and config.getoption("benchmark_timer") == "time.perf_counter":
        config.option.benchmark_timer = "time.thread_time"
    # torch.compile's internals trip this deprecation on every compile; it is not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

    storage = storage_dir(config)
    state.machine.cpu = this_cpu()
    state.machine.key, state.machine.label = cpu_key(state.machine.cpu), cpu_label(state.machine.cpu)
    if storage is not None and not config.getoption("perf_flat_storage"):
        # per-CPU baselines: pytest-benchmark's file storage rooted at <storage>/<cpu key>, so that
        # --benchmark-save lands in <storage>/<cpu key>/<machine id>/NNNN_<name>.json
        config.option.benchmark_storage = f"file://{storage / state.machine.key}"
    compare = config.getoption("benchmark_compare")
    if compare and not benchmarks_off(config):
        if storage is not None:
            choose_mode(config, state, storage, compare)
        if state.compare.mode == "stored":
            backstop = config.getoption("perf_backstop")
            if backstop and backstop != "off" and not config.getoption("benchmark_compare_fail"):
                from pytest_benchmark.utils import parse_compare_fail

                try:
                    config.option.benchmark_compare_fail = [parse_compare_fail(backstop)]
                except Exception as exc:  # argparse.ArgumentTypeError
                    raise pytest.UsageError(f"--perf-backstop: {exc}") from None
    return state


def choose_mode(config: pytest.Config, state: PerfState, storage: Path, compare) -> None:
    """Stored baseline for this CPU, or same-job A/B against a baseline's revision (perf/README.md, "Modes").

    ``compare`` is ``--benchmark-compare``'s value (True: the newest saved run). Sets ``state.compare``
    (and ``state.ab`` in mode "ab"); raises ``pytest.UsageError`` when no usable baseline exists.
    """
    from pytest_benchmark.utils import get_machine_id

    from perf import ab

    machine_id = get_machine_id()
    want = config.getoption("perf_mode")
    cpu_dir = storage if config.getoption("perf_flat_storage") else storage / state.machine.key
    own_error = None
    try:
        base = load_baseline(locate_baseline(cpu_dir, machine_id, compare))
    except BaselineError as exc:
        own_error, base = exc, None
    if base is None:
        # no baseline for this CPU: the newest baseline of this platform/Python, any CPU, for A/B
        if compare is not True or want == "stored":
            raise pytest.UsageError(with_ab_hint(str(own_error), state)) from None
        candidates = []
        for path in all_saved_runs(storage, machine_id):
            try:
                candidates.append(load_baseline(path))
            except BaselineError:
                continue
        if not candidates:
            raise pytest.UsageError(with_ab_hint(str(own_error), state)) from None
        base = max(candidates, key=lambda b: (b.datetime, b.path.name))
    base_cpu = baseline_cpu(base.machine_info)
    state.compare.accuracy_baseline = base  # accuracy is the same on any CPU: gated against any baseline
    if same_cpu(base_cpu, state.machine.cpu) and want != "ab":
        state.compare.mode = "stored"
        state.compare.baseline = base
        state.compare.mode_line = f"stored baseline for {state.machine.label}: {base.label} (saved {base.datetime})"
        return
    if want == "stored":
        raise pytest.UsageError(
            f"QINS perf gate: --perf-mode=stored, but baseline {base.label} was measured on {cpu_label(base_cpu)}, "
            f"not on this CPU, {state.machine.label}. Its speed figures are never used here.\n"
            f"Create a baseline for this CPU with:\n    {SAVE_COMMAND}\n(then commit it), or use --perf-mode=auto "
            "(A/B)."
        )
    try:
        rev = ab.resolve_revision(config.rootpath, (base.commit_info or {}).get("id"), base.label)
    except ab.RevisionError as exc:
        raise pytest.UsageError(
            f"QINS perf gate: no baseline for this CPU ({state.machine.label}); the newest baseline, {base.label}, "
            f"was measured on {cpu_label(base_cpu)}, so its revision would be measured here (A/B).\n{exc}"
        ) from None
    state.compare.mode = "ab"
    state.ab.base = base
    state.ab.rev = rev
    why = (
        "--perf-mode=ab"
        if same_cpu(base_cpu, state.machine.cpu)
        else f"no baseline for {state.machine.label}; {base.label} is from {cpu_label(base_cpu)}"
    )
    dirty = (
        " (that baseline was saved from a dirty tree: the revision may not be exactly what it measured)"
        if (base.commit_info or {}).get("dirty")
        else ""
    )
    state.compare.mode_line = f"A/B against {rev[:12]} measured here ({why}){dirty}"
    # nothing stored is compared in A/B: no pytest-benchmark comparison, no absolute backstop
    config.option.benchmark_compare = None
    config.option.benchmark_compare_fail = None


def with_ab_hint(msg: str, state: PerfState) -> str:
    """``msg`` and where this CPU's baselines live."""
    return f"{msg}\n(This CPU: {state.machine.label}; its baselines live under .benchmarks/{state.machine.key}/.)"


def choose_clock(config: pytest.Config) -> str:
    """``--perf-clock`` resolved ("auto": CPU time without CUDA, wall with it) and given to the timers."""
    choice = config.getoption("perf_clock")
    if choice == "auto":
        import torch

        choice = "wall" if torch.cuda.is_available() else "cpu"
    from perf import timing

    timing.use_clock(choice)
    return choice


def benchmarks_off(config: pytest.Config) -> bool:
    """Whether pytest-benchmark skips or disables every benchmark in this run."""
    return bool(
        config.getoption("benchmark_skip")
        or (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))
    )


def report_header(state: PerfState) -> list[str]:
    """The lines ``pytest_report_header`` prints: settings, CPU and mode."""
    return [
        f"qins-perf: threads={state.settings.threads} clock={state.settings.clock} tolerances={state.settings.tol} "
        f"budget={state.settings.budget}"
        + (f" INJECTED SLOWDOWN x{state.settings.factor}" if state.settings.factor != 1.0 else ""),
        f"qins-perf: CPU {state.machine.label} (baselines under <storage>/{state.machine.key}/)",
        f"qins-perf: mode: {state.compare.mode_line}",
    ]
