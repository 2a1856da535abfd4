"""Baseline files: pytest-benchmark's file storage, located and validated for the gate.

Baselines are the JSON files pytest-benchmark writes with ``--benchmark-save`` under its storage
(``.benchmarks/<cpu key>/<machine id>/NNNN_<name>.json``). A baseline is usable when it is valid
JSON in pytest-benchmark's schema, gates at least one QINS figure and was not measured with an
injected slowdown; anything else raises :class:`BaselineError` with a how-to.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from perf.gate import GATE_KEY, SAVE_COMMAND

#: pytest-benchmark's default glob for saved runs ("NNNN_name.json").
SAVED_RUN_GLOB = "[0-9][0-9][0-9][0-9]_*.json"


class BaselineError(Exception):
    """No usable baseline: the message says what is wrong and how to create one."""



@dataclass
class Baseline:
    path: Path
    entries: dict  # fullname -> extra_info
    machine_info: dict = field(default_factory=dict)
    commit_info: dict = field(default_factory=dict)
    datetime: str = ""

    @property
    def label(self) -> str:
        return display_path(self.path)

    def entry(self, fullname: str) -> dict:
        """The baseline ``extra_info`` for a benchmark ({} when the baseline lacks it)."""
        return self.entries.get(fullname, {})


def display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _create_hint(storage: Path) -> str:
    return (
        f"Create one on this machine with:\n    {SAVE_COMMAND}\n"
        f"(it writes {display_path(storage)}/<machine id>/NNNN_baseline.json; commit that file), "
        f"or run without --benchmark-compare to benchmark without the gate."
    )


def locate_baseline(storage: Path, machine_id: str, compare) -> Path:
    """The file ``--benchmark-compare[=compare]`` means, as pytest-benchmark picks it.

    ``compare`` is True (the latest saved run for this machine id), a run number / name prefix
    (``0001``), or a path to a JSON file. Raises BaselineError with a how-to when nothing matches.
    """
    storage = Path(storage)
    if compare is not True:
        candidate = Path(str(compare))
        if candidate.is_file():
            return candidate
    machine_dir = storage / machine_id
    if compare is True:
        files = sorted(machine_dir.glob(SAVED_RUN_GLOB), key=lambda p: p.name)
        wanted = f"{display_path(machine_dir)}/NNNN_*.json"
    else:
        prefix = str(compare).rstrip("*")
        files = sorted(machine_dir.glob(prefix + "*.json"), key=lambda p: p.name)
        wanted = f"{display_path(machine_dir)}/{prefix}*.json"
    if files:
        return files[-1]

    others = sorted(
        {p.parent.name for p in storage.glob("*/" + SAVED_RUN_GLOB) if p.parent.name != machine_id}
    ) if storage.is_dir() else []
    msg = [
        f"QINS perf gate: no baseline to compare against: nothing matches {wanted} (this machine id is {machine_id!r})."
    ]
    if others:
        msg.append(
            f"Baselines exist only for other machine ids: {', '.join(others)}. They were measured on a "
            f"different platform/Python; compare against one explicitly with --benchmark-compare=<path to its .json> "
            f"if that is really wanted."
        )
    msg.append(_create_hint(storage))
    raise BaselineError("\n".join(msg))


def load_baseline(path: Path) -> Baseline:
    """Read and validate a pytest-benchmark saved run; raise BaselineError if it is unusable."""
    path = Path(path)
    where = display_path(path)
    storage = path.parent.parent if path.parent.parent != path.parent else path.parent
    try:
        text = path.read_text(encoding="utf8")
    except OSError as exc:
        raise BaselineError(
            f"QINS perf gate: cannot read baseline {where}: {exc.strerror or exc}.\n{_create_hint(storage)}"
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BaselineError(
            f"QINS perf gate: baseline {where} is corrupt (not valid JSON: {exc}).\n"
            f"Delete it (or restore it from git: git checkout -- {where}). {_create_hint(storage)}"
        ) from None
    problem = _schema_problem(data)
    if problem:
        raise BaselineError(
            f"QINS perf gate: baseline {where} is corrupt or not a pytest-benchmark run ({problem}).\n"
            f"Delete it (or restore it from git: git checkout -- {where}). {_create_hint(storage)}"
        )
    entries = {b["fullname"]: dict(b.get("extra_info") or {}) for b in data["benchmarks"]}
    if not any(e.get(GATE_KEY) for e in entries.values()):
        raise BaselineError(
            f"QINS perf gate: baseline {where} has no gated QINS figures (was it saved by this perf suite?).\n"
            f"{_create_hint(storage)}"
        )
    if any(e.get("inject_slowdown", 1.0) != 1.0 for e in entries.values()):
        raise BaselineError(
            f"QINS perf gate: baseline {where} was measured with an injected slowdown and cannot serve as a baseline.\n"
            f"{_create_hint(storage)}"
        )
    return Baseline(
        path=path,
        entries=entries,
        machine_info=data.get("machine_info") or {},
        commit_info=data.get("commit_info") or {},
        datetime=str(data.get("datetime", "")),
    )


def _schema_problem(data) -> str:
    if not isinstance(data, dict):
        return f"top level is {type(data).__name__}, expected an object"
    benches = data.get("benchmarks")
    if not isinstance(benches, list):
        return "no 'benchmarks' list"
    if not benches:
        return "the 'benchmarks' list is empty"
    for i, b in enumerate(benches):
        if not isinstance(b, dict):
            return f"benchmarks[{i}] is not an object"
        if not isinstance(b.get("fullname"), str):
            return f"benchmarks[{i}] has no 'fullname'"
        stats = b.get("stats")
        if not isinstance(stats, dict) or not isinstance(stats.get("min"), (int, float)):
            return f"benchmarks[{i}] ({b.get('fullname')}) has no numeric 'stats.min'"
        extra = b.get("extra_info", {})
        if not isinstance(extra, dict):
            return f"benchmarks[{i}] ({b['fullname']}) has a non-object 'extra_info'"
        gated = extra.get(GATE_KEY)
        if gated is not None and not (isinstance(gated, list) and all(isinstance(g, str) for g in gated)):
            return f"benchmarks[{i}] ({b['fullname']}) has a malformed '{GATE_KEY}' list"
    return ""


def all_saved_runs(storage: Path, machine_id: str) -> list[Path]:
    """Every saved run of this platform/Python under the storage root, any CPU, newest name last.

    Layouts: ``<root>/<cpu key>/<machine id>/NNNN_*.json`` (per-CPU) and the older
    ``<root>/<machine id>/NNNN_*.json``.
    """
    storage = Path(storage)
    if not storage.is_dir():
        return []
    found = list(storage.glob(f"*/{machine_id}/{SAVED_RUN_GLOB}")) + list(
        storage.glob(f"{machine_id}/{SAVED_RUN_GLOB}")
    )
    return sorted(set(found), key=lambda p: (p.name, str(p)))
