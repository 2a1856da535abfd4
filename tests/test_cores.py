"""qins.testing.cores.usable_cores: the affinity mask where there is one, else os.cpu_count(), else 1."""
from __future__ import annotations

import os

import pytest

from qins.testing import cores


def test_usable_cores_counts_the_affinity_mask_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cores.usable_cores() == 3


def test_usable_cores_asks_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: asked.append(pid) or {1}, raising=False)
    assert cores.usable_cores() == 1
    assert asked == [0]


def test_usable_cores_without_sched_getaffinity_is_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cores.usable_cores() == 6


def test_usable_cores_is_one_when_the_core_count_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cores.usable_cores() == 1


def test_usable_cores_on_this_machine_is_a_positive_count() -> None:
    n = cores.usable_cores()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or n)
