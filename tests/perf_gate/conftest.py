"""Fixtures of the perf gate's tests: a synthetic perf suite run under the real plugin in a subprocess,
in a plain directory (``synth``) or in a git checkout (``synth_git``, for the A/B modes). The tests
that use them are marked ``slow``."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.perf_gate.support import (
    NO_HYPOTHESIS,
    PYTEST,
    ROOT,
    SYNTH_AB_TEST,
    SYNTH_CONFTEST,
    SYNTH_TEST,
    _git,
)

_HERE = Path(__file__).resolve().parent
#: the fixtures that run a synthetic perf suite in a subprocess (a pytest run each, seconds to a minute)
_SUBPROCESS_FIXTURES = frozenset({"synth", "synth_git"})


@pytest.fixture(autouse=True)
def _children_are_not_xdist_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``pytest -n``, hide pytest-xdist's worker variables from the perf runs these tests start
    (synthetic suites, the A/B's old side): pytest-benchmark reads them there and disables every
    benchmark. The worker itself read them at its start."""
    for name in [k for k in os.environ if k.startswith("PYTEST_XDIST_")]:
        monkeypatch.delenv(name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test of this directory that runs a synthetic suite in a subprocess
    (``pytest tests`` leaves them out; ``--run-slow`` and CI run them, see ``tests/slow.py``)."""
    for item in items:
        if _HERE in item.path.parents and _SUBPROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def synth(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(SYNTH_CONFTEST)
    (tmp_path / "test_synth.py").write_text(SYNTH_TEST)

    def run(*args, first=1.0, again=None, sleep=0.0, backstop="off", clock="cpu"):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["SYNTH_FIRST"] = str(first)
        env["SYNTH_SLEEP"] = str(sleep)
        env.pop("QINS_PERF_INJECT_SLOWDOWN", None)
        env.update(NO_HYPOTHESIS)
        if again is not None:
            env["SYNTH_AGAIN"] = str(again)
        cmd = [*PYTEST, f"--perf-backstop={backstop}", f"--perf-clock={clock}", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    run.path = tmp_path
    return run


@pytest.fixture
def synth_git(tmp_path):
    """A git checkout with a synthetic perf suite whose figures come from files in the tree."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pytest.ini").write_text("[pytest]\n")
    (repo / "conftest.py").write_text(SYNTH_CONFTEST)
    (repo / "test_synth.py").write_text(SYNTH_AB_TEST)
    (repo / "ratio.txt").write_text("2.0")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "old")

    def run(*args, cwd=repo):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("QINS_PERF_INJECT_SLOWDOWN", None)
        env.update(NO_HYPOTHESIS)
        cmd = [*PYTEST, "--perf-backstop=off", "--perf-clock=cpu", *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    run.repo = repo
    return run
