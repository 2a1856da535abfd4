"""Same-job A/B: measure the baseline's revision on this machine, next to this revision.

Used when this machine's CPU has no baseline of its own (perf/README.md, "Modes"). The old
revision's tree is exported with ``git archive`` (its ``perf/`` benchmark code and its ``qins``,
nothing else of this checkout) into a temporary directory and its suite is run there in a
subprocess with pytest-benchmark's ``--benchmark-json``; ``import qins`` resolves to the exported
tree (it is first on ``sys.path``), never to this checkout. No gating happens in the old run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from perf.gate import INJECT_ENV, SAVE_COMMAND


class RevisionError(Exception):
    """The baseline's revision cannot be measured here; the message says why and what to do."""


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check, timeout=120)


def resolve_revision(repo: Path, rev: str | None, baseline_label: str) -> str:
    """The full commit id of ``rev`` if this checkout has it; RevisionError (with what to do) otherwise."""
    todo = (
        f"Either make the revision available (in a shallow clone: git fetch --unshallow, or "
        f"git fetch --depth=<enough to reach it> origin; or git fetch origin {rev or '<rev>'}), "
        f"or measure a baseline for this CPU: {SAVE_COMMAND} (then commit it)."
    )
    if not rev:
        raise RevisionError(
            f"QINS perf gate: baseline {baseline_label} records no git revision (commit_info.id), so it cannot be "
            f"re-measured here.\n{todo}"
        )
    try:
        top = _git(repo, "rev-parse", "--show-toplevel", check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RevisionError(
            f"QINS perf gate: cannot run git to check out the baseline's revision {rev[:12]} ({exc}).\n{todo}"
        ) from None
    if top.returncode != 0:
        raise RevisionError(
            f"QINS perf gate: {repo} is not a git checkout, so the baseline's revision {rev[:12]} cannot be checked "
            f"out.\n{todo}"
        )
    got = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if got.returncode != 0:
        shallow = _git(repo, "rev-parse", "--is-shallow-repository", check=False).stdout.strip() == "true"
        why = (
            "this is a shallow clone and the revision is not in it" if shallow else "the revision is not in this clone"
        )
        raise RevisionError(
            f"QINS perf gate: the baseline {baseline_label} was measured at revision {rev[:12]}, which cannot be "
            f"checked out here: {why}.\n{todo}"
        )
    return got.stdout.strip()


def has_path(repo: Path, rev: str, path: str) -> bool:
    """Whether the (resolved) revision ``rev`` of ``repo`` has the file ``path``."""
    return _git(repo, "cat-file", "-e", f"{rev}:{path}", check=False).returncode == 0


def tree_env(tree: Path, *, drop_inject: bool = False) -> dict:
    """This process's environment with ``tree`` first on ``PYTHONPATH`` (its ``qins`` and ``perf`` are the
    ones a subprocess imports); ``drop_inject``: without the self-check's injected slowdown."""
    env = dict(os.environ)
    if drop_inject:
        env.pop(INJECT_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def lacks_node(tree: Path, nodeid: str, timeout_s: float = 300) -> bool:
    """Whether the suite in ``tree`` (an exported revision) says it has no test ``nodeid``: pytest's
    collection there (as :func:`run_suite` runs it) reports the id not found (exit 4) or collects
    nothing (exit 5). Any other failure to collect is not taken for an absence (``False``)."""
    env = tree_env(tree)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", nodeid]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    out = proc.stdout + proc.stderr
    return proc.returncode == 5 or (proc.returncode == 4 and "not found" in out)


def export_revision(repo: Path, rev: str, dest: Path) -> Path:
    """``git archive rev | tar -x`` into ``dest``: the old tree, independent of this checkout's state."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev], capture_output=True, timeout=300)
    if archive.returncode != 0:
        raise RevisionError(
            f"QINS perf gate: git archive {rev[:12]} failed: {archive.stderr.decode(errors='replace').strip()}"
        )
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) else tar.extractall(dest)  # noqa: S202
    return dest


class OldSide:
    """The exported old revision, and its suite run in a subprocess (one call per round)."""

    def __init__(self, repo: Path, rev: str, selection: Sequence[str], keyword: str | None, marker: str | None,
                 options: Sequence[str] = ()):
        """``options``: ``--perf-x=value`` measurement settings of this run (clock, threads, budget),
        passed on to the old suite so that both sides measure alike; those the old revision's plugin
        does not define are left out and listed in ``dropped_options``."""
        self.repo, self.rev = Path(repo), rev
        self.tmp = Path(tempfile.mkdtemp(prefix=f"qins-ab-{rev[:8]}-"))
        try:
            self.tree = export_revision(self.repo, rev, self.tmp / "tree")
        except BaseException:
            self.cleanup()
            raise
        self.selection = [s for s in selection if (self.tree / s.split("::")[0]).exists()]
        if not self.selection:
            self.cleanup()
            raise RevisionError(
                f"QINS perf gate: revision {rev[:12]} has none of {', '.join(selection) or 'the selected tests'} to "
                "measure."
            )
        self.keyword, self.marker = keyword, marker
        # the plugin the old run will import: its tree's, else the first on PYTHONPATH (as Python resolves it);
        # its options are declared in perf/plugin.py, or in perf/options.py in a plugin split by concern
        roots = [self.tree] + [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        perf_dir = next((r / "perf" for r in roots if (r / "perf" / "plugin.py").exists()), None)
        sources = [perf_dir / "plugin.py", perf_dir / "options.py"] if perf_dir is not None else []
        known = "".join(p.read_text(errors="replace") for p in sources if p.exists())
        self.options = [o for o in options if f'"{o.split("=", 1)[0]}"' in known]
        self.dropped_options = [o for o in options if o not in self.options]
        self.runs: list[dict] = []  # per round: fullname -> extra_info
        self.seconds: list[float] = []
        self.mins: list[dict] = []  # per run: fullname -> minimum time (s)

    def run(self, round_no: int, timeout_s: float = 1200) -> dict:
        """One run of the old suite's selection: ``{fullname: extra_info}``; each benchmark's minimum
        time (s) goes to ``self.mins`` (one dict per run)."""
        entries, mins, returncode, seconds = run_suite(
            self.tree,
            self.selection,
            self.options,
            self.tmp,
            f"round{round_no}",
            label=f"the old revision's suite ({self.rev[:12]})",
            keyword=self.keyword,
            marker=self.marker,
            drop_inject=True,
            timeout_s=timeout_s,
        )
        self.seconds.append(seconds)
        self.runs.append(entries)
        self.mins.append(mins)
        self.returncodes = getattr(self, "returncodes", []) + [returncode]
        return entries

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


#: rounds of a confirmation A/B (each side in a fresh process); a figure fails when beyond its limit
#: in more than half of them (2 of 3)
CONFIRM_ROUNDS = 3


class Confirmation(NamedTuple):
    """What :func:`confirm` measured, one item a run: ``{fullname: extra_info}`` (for
    :func:`perf.ab_verdicts.ab_decide`) and ``{fullname: minimum time in s}`` (for
    :func:`perf.ab_verdicts.backstop_decide`), of this revision and of the old one."""

    new_runs: list
    old_runs: list
    new_mins: list
    old_mins: list


def confirm(
    old: OldSide, root: Path, nodeid: str, options: Sequence[str], rounds: int = CONFIRM_ROUNDS
) -> Confirmation:
    """A same-work A/B of one benchmark: ``rounds`` rounds alternating which side goes first (the
    old revision first in round 1), **each side a run of** ``nodeid`` **in a fresh subprocess**: the
    old revision's suite, and this revision's (from ``root``, with this run's ``options``, injected
    slowdown included). Fresh processes on both sides, because a figure can depend on the process:
    on an AMD EPYC family 23 model 1 the cached forward at 1024x1024, batch 1, measured
    0.66, 0.83, 1.07 and 0.90x nn.Linear in four fresh processes of the same code, each steady
    within its process, so re-measuring in this run's process repeats its value. Both the figures
    and the absolute times come back (:class:`Confirmation`); the backstop judges the latter
    (:func:`confirm_backstop`). Raises :class:`RevisionError` when either suite fails to run."""
    old.selection = [nodeid]
    new: list[tuple[dict, dict]] = []
    olds: list[tuple[dict, dict]] = []

    def new_side() -> None:
        entries, mins, _, _ = run_suite(Path(root), [nodeid], options, old.tmp, f"new{len(old.runs)}-{len(new) + 1}",
                                        label="this revision's suite")
        new.append((entries, mins))

    def old_side() -> None:
        old.run(len(old.runs) + 1)
        olds.append((old.runs[-1], old.mins[-1]))

    _alternate(rounds, old_side, new_side)
    return Confirmation([e for e, _ in new], [e for e, _ in olds], [m for _, m in new], [m for _, m in olds])


def _alternate(rounds: int, old_side: Callable[[], object], new_side: Callable[[], object]) -> None:
    """Run both sides ``rounds`` times, the old side first in even rounds (round 1) and last in odd ones."""
    for i in range(rounds):
        for side in ((old_side, new_side) if i % 2 == 0 else (new_side, old_side)):
            side()


def run_suite(tree: Path, selection: Sequence[str], options: Sequence[str], tmp: Path, tag: str, *, label: str,
              keyword: str | None = None, marker: str | None = None, drop_inject: bool = False,
              timeout_s: float = 1200) -> tuple[dict, dict, int, float]:
    """Run ``pytest selection`` in ``tree`` in a subprocess (``tree`` first on ``PYTHONPATH``, so its
    ``qins`` and ``perf`` are the ones imported), with pytest-benchmark's ``--benchmark-json``.
    Returns ``({fullname: extra_info}, {fullname: min time in s}, exit code, wall seconds)``;
    :class:`RevisionError` (naming ``label`` and the log) when it produced no results.
    ``drop_inject``: run without the self-check's injected slowdown (it slows this revision only)."""
    out_json, log = tmp / f"{tag}.json", tmp / f"{tag}.log"
    cmd = [sys.executable, "-m", "pytest", *selection, "-p", "no:cacheprovider", "-q",
           f"--benchmark-json={out_json}", f"--benchmark-storage=file://{tmp / 'store'}", *options]
    if keyword:
        cmd += ["-k", keyword]
    if marker:
        cmd += ["-m", marker]
    env = tree_env(tree, drop_inject=drop_inject)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RevisionError(f"QINS perf gate: {label} ran past {timeout_s:.0f} s (log: {log}).") from None
    seconds = time.perf_counter() - t0
    try:
        data = json.loads(out_json.read_text())
    except (OSError, ValueError):
        tail = log.read_text(errors="replace")[-2000:]
        raise RevisionError(
            f"QINS perf gate: {label} produced no results (exit {proc.returncode}; log {log}):\n{tail}"
        ) from None
    benches = [b for b in data.get("benchmarks", []) if isinstance(b, dict) and "fullname" in b]
    entries = {b["fullname"]: dict(b.get("extra_info") or {}) for b in benches}
    mins = {
        b["fullname"]: float(b["stats"]["min"])
        for b in benches
        if isinstance(b.get("stats"), dict) and "min" in b["stats"]
    }
    return entries, mins, proc.returncode, seconds


def confirm_backstop(
    old: OldSide, root: Path, nodeid: str, options: Sequence[str], rounds: int = 2
) -> tuple[list, list]:
    """:func:`confirm` of one benchmark's absolute time (``rounds`` rounds, old side first in round 1).
    Returns ``(new_mins, old_mins)`` in seconds for :func:`perf.ab_verdicts.backstop_decide`. Raises
    :class:`RevisionError` when either suite fails to run or does not report the benchmark."""
    measured = confirm(old, root, nodeid, options, rounds)

    def one(mins: dict, label: str) -> float:
        if len(mins) != 1:
            raise RevisionError(f"QINS perf gate: {label} reported {len(mins)} benchmarks for {nodeid}, expected 1.")
        return next(iter(mins.values()))

    return ([one(m, "this revision's suite") for m in measured.new_mins],
            [one(m, f"the old revision's suite ({old.rev[:12]})") for m in measured.old_mins])
