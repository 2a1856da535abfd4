"""Snapshots of every namespace :mod:`qins.integrations.transformers.compat` may touch, to prove that
tests leave none patched.

``tests/conftest.py`` takes one snapshot when collection finishes and compares it, by identity,
after every test (and after every module, for modules whose ``patched`` fixture holds the patch
across their tests). ``tests/test_compat.py`` uses the same helpers inside single tests.
"""
from __future__ import annotations

import importlib
import sys

MASK_MODULE = "transformers.modeling_attn_mask_utils"

#: Names that Python itself writes into a module's namespace, never a patch: ``warnings.warn`` creates
#: ``__warningregistry__`` in the module a warning is attributed to (transformers 5.25's mask module
#: warns that it is deprecated whenever it is used, patched or not).
NOT_PATCHES = frozenset({"__warningregistry__"})


def namespaces() -> dict[str, dict]:
    """Shallow copies of every namespace the patch may touch (values compared by identity)."""
    from transformers import GenerationMixin, PretrainedConfig, dynamic_module_utils
    from transformers.cache_utils import Cache, DynamicCache

    spaces = {
        "Cache": dict(vars(Cache)),
        "DynamicCache": dict(vars(DynamicCache)),
        "PretrainedConfig": dict(vars(PretrainedConfig)),
        "GenerationMixin": dict(vars(GenerationMixin)),
        "dynamic_module_utils": dict(vars(dynamic_module_utils)),
        "sys.modules[mask]": {"module": sys.modules[MASK_MODULE]} if MASK_MODULE in sys.modules else {},
    }
    if sys.modules.get(MASK_MODULE) is not None:
        spaces["mask module"] = dict(vars(sys.modules[MASK_MODULE]))
    return spaces


def differences(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """What differs between two :func:`namespaces` snapshots: added, removed or rebound names
    (:data:`NOT_PATCHES` excepted)."""
    out = [f"namespace {s} {'appeared' if s in after else 'vanished'}" for s in before.keys() ^ after.keys()]
    for space in before.keys() & after.keys():
        b = {n: v for n, v in before[space].items() if n not in NOT_PATCHES}
        a = {n: v for n, v in after[space].items() if n not in NOT_PATCHES}
        out += [f"{space}.{n} added" for n in sorted(a.keys() - b.keys())]
        out += [f"{space}.{n} removed" for n in sorted(b.keys() - a.keys())]
        out += [f"{space}.{n} changed" for n in sorted(b.keys() & a.keys()) if a[n] is not b[n]]
    return sorted(out)


def assert_same(before: dict[str, dict], after: dict[str, dict]) -> None:
    diff = differences(before, after)
    assert not diff, "transformers namespaces differ: " + "; ".join(diff)


def baseline() -> dict[str, dict]:
    """The snapshot to compare against: taken with the real mask module imported where it exists,
    so that a test importing it later is not mistaken for a patch."""
    try:
        importlib.import_module(MASK_MODULE)
    except ImportError:
        pass
    return namespaces()
