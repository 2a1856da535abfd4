"""mutmut's ``max_stack_depth``, made to work on this code (installed by ``tests/conftest.py``).

``max_stack_depth = N`` (``[tool.mutmut]``) maps a test to a function of ``qins/`` only when the
test reaches it through fewer than ``N`` frames of ``qins/`` code; the test runner's frames end the
walk. mutmut 3.8.1's own ``record_trampoline_hit`` resolves every frame's file with
``Path.resolve(strict=True)``, which raises ``FileNotFoundError`` on a frame with no file (the
``"<string>"`` of a dataclass' generated ``__init__``, e.g. ``QinsConfig(...)``), so its stats pass
aborts on this suite; it also resolves each frame on every call. Upstream: boxed/mutmut PR #570
(open). :func:`record_trampoline_hit` is the same rule with frames that have no file counted as
"other" code, and each file's kind cached.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

#: substrings of a test runner's file name: the walk up the stack stops at the first such frame
RUNNER_MARKERS = ("pytest", "hammett", "unittest")
RUNNER, MUTATED, OTHER = "runner", "mutated", "other"


def frame_kind(filename: str, mutated_roots: Sequence[Path]) -> str:
    """``RUNNER``, ``MUTATED`` (a file under one of ``mutated_roots``) or ``OTHER`` (library code,
    and frames without a file such as ``"<string>"``)."""
    if any(m in filename for m in RUNNER_MARKERS):
        return RUNNER
    if not os.path.isabs(filename):  # "<string>", "<frozen ...>": no file to place
        return OTHER
    try:
        path = Path(filename).resolve(strict=True)
    except OSError:
        return OTHER
    return MUTATED if any(root in path.parents for root in mutated_roots) else OTHER


_cached_kind = lru_cache(maxsize=None)(lambda filename, roots: frame_kind(filename, roots))


def within_depth(frame, depth: int, mutated_roots: Sequence[Path]) -> bool:
    """Whether fewer than ``depth`` frames of mutated code lie between ``frame`` and the test
    runner (``depth`` = -1: no limit). Frames of other code are not counted."""
    if depth == -1:
        return True
    roots = tuple(mutated_roots)
    budget = depth
    while budget and frame is not None:
        kind = _cached_kind(frame.f_code.co_filename, roots)
        frame = frame.f_back
        if kind == RUNNER:
            break
        if kind == MUTATED:
            budget -= 1
    return budget > 0


def record_trampoline_hit(name: str, caller: str | None = None) -> None:
    """mutmut's hit recorder (``mutmut.stats.record_trampoline_hit``) with :func:`within_depth`."""
    from mutmut.configuration import config
    from mutmut.state import state

    assert not name.startswith("src."), "Failed trampoline hit. Module name starts with `src.`, which is invalid"
    cfg = config()
    if not within_depth(inspect.currentframe(), cfg.max_stack_depth, cfg.resolved_mutated_source_paths):
        return
    state()._stats.add(name)
    if caller is not None and cfg.track_dependencies:
        state().function_dependencies[name].add(caller)


def install(stats_module=None, trampoline_module=None) -> bool:
    """Put :func:`record_trampoline_hit` where mutmut's trampolines call it (``mutmut.mutation.trampoline``
    imports mutmut's by name). Returns False, changing nothing, when mutmut is not installed or its
    layout is not the one this replaces. The modules default to mutmut's own (given in tests)."""
    if stats_module is None or trampoline_module is None:
        try:
            import mutmut.stats as stats_module
            from mutmut.mutation import trampoline as trampoline_module
        except ImportError:
            return False
    current = getattr(trampoline_module, "record_trampoline_hit", None)
    if current is record_trampoline_hit:
        return True
    if current is None or current is not getattr(stats_module, "record_trampoline_hit", None):
        return False
    trampoline_module.record_trampoline_hit = record_trampoline_hit
    return True


def child_environ(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a Python process that a test starts: under mutmut's stats pass without
    ``MUTANT_UNDER_TEST``, so the child runs the original code instead of recording hits nobody
    reads (with mutmut's own recorder, which fails on the child's ``-c`` script frame, ``"<string>"``).
    Under a mutant the name stays: the child runs the mutant, and a test can kill it there."""
    out = dict(env)
    if out.get("MUTANT_UNDER_TEST") == "stats":
        del out["MUTANT_UNDER_TEST"]
    return out
