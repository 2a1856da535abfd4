"""The CPU cores this process may run on, for sizing torch's thread pool in tests and benchmarks."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """How many CPU cores this process may run on (count, at least 1).

    Its affinity mask (``os.sched_getaffinity(0)``) where the platform has one: under ``taskset``,
    a cgroup cpuset or a CI runner's limit, fewer than the machine's cores, and more torch threads
    than these only wait at OpenMP barriers for a descheduled thread. Elsewhere (macOS, Windows)
    ``os.cpu_count()``, or 1 when even that is unknown.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
