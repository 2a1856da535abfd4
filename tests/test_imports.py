"""Imports point one way: formats (leaf) -> kernels -> encode -> layer / state -> convert -> integrations.

* The graph of qins-internal imports (top-level and inside functions, read with ``ast``) has no cycle.
* The core modules import without ``transformers`` (each alone, in a fresh interpreter).
* No core module imports :mod:`qins.integrations`; only :mod:`qins.integrations.transformers` (and the
  test helpers of :mod:`qins.testing`) import ``transformers``.
* ``import qins`` works where ``transformers`` and ``accelerate`` cannot be imported.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutmut_depth import child_environ

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qins"

CORE = ["qins.formats", "qins.kernels", "qins.encode", "qins.layer", "qins.state", "qins.convert",
        "qins.serialization", "qins.mulaw", "qins.calibrated", "qins.embedding", "qins.codec", "qins.calibration",
        "qins.streaming", "qins.hf_config", "qins.coded"]

#: front ends that may import the integrations: the package itself (its public names) and the command line
FRONT_ENDS = {"qins", "qins.__main__", "qins.cli"}
INTEGRATIONS = "qins.integrations"
#: besides the transformers integration, only the test helpers may import transformers
TRANSFORMERS_USERS = ("qins.integrations.transformers", "qins.testing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """``module -> {qins modules it imports}``, for every import statement anywhere in the module
    (``TYPE_CHECKING`` blocks and function bodies included). ``from . import x`` counts as an import
    of ``qins.x`` when that is a module, else of the package."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module if node.module and node.module.split(".")[0] == "qins" else None
                else:
                    base = _resolve(name, is_package, node.level, node.module)
                if base is not None:  # from base import a, b: the submodules a, b, else base itself
                    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                    targets += subs if subs else [base]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.split(".")[0] == "qins"]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None. Edges into a package's own
    ``__init__`` from inside it are not cycles of concern (Python runs the parent first) and are left
    out: ``qins.x -> qins`` never appears since no module imports ``qins`` itself."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_the_graph_reader_sees_imports_inside_functions(tmp_path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    assert "qins.formats" in graph["qins.encode"]  # top level
    assert "qins.integrations.transformers.checkpoint" in graph["qins.cli"]  # inside a function
    assert "qins.kernels.reference" in graph["qins.kernels"]  # from . import reference


def test_qins_internal_imports_have_no_cycle() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_of_qins_imports_the_package_itself() -> None:
    graph = import_graph()
    assert [m for m, deps in graph.items() if "qins" in deps] == []


def test_the_leaves_import_only_leaves() -> None:
    """formats and codec import nothing of qins; the shared helpers (rounding, hf_config) only them."""
    graph = import_graph()
    leaves = {"qins.formats", "qins.codec"}
    assert {m: sorted(graph[m]) for m in leaves if graph[m]} == {}
    for helper in ("qins.rounding", "qins.hf_config"):
        assert graph[helper] <= leaves, (helper, sorted(graph[helper] - leaves))


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def core_modules() -> list[str]:
    """Every module of qins but the front ends, the integrations and the test helpers."""
    return sorted(m for m in _modules() if m not in FRONT_ENDS and not _under(m, INTEGRATIONS)
                  and not _under(m, "qins.testing"))


def transformers_importers() -> dict[str, list[int]]:
    """``module -> [line numbers]`` of every ``import transformers...`` / ``from transformers... import``
    anywhere in a qins module (function bodies included)."""
    found: dict[str, list[int]] = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                hit = any(a.name.split(".")[0] == "transformers" for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                hit = node.level == 0 and (node.module or "").split(".")[0] == "transformers"
            else:
                continue
            if hit:
                found.setdefault(name, []).append(node.lineno)
    return found


def test_the_core_list_covers_the_modules_named_as_core() -> None:
    assert set(CORE) <= set(core_modules())
    assert {"qins.codec", "qins.formats", "qins.kernels", "qins.encode", "qins.layer", "qins.state", "qins.convert",
            "qins.serialization", "qins.embedding", "qins.calibration"} <= set(core_modules())


def test_the_core_does_not_import_the_integrations() -> None:
    graph = import_graph()
    assert "qins.integrations.transformers.quantizer" in graph  # the reader sees the subpackage
    offenders = {m: sorted(d for d in graph[m] if _under(d, INTEGRATIONS)) for m in core_modules()}
    assert {m: deps for m, deps in offenders.items() if deps} == {}


def test_only_the_transformers_integration_imports_transformers() -> None:
    found = transformers_importers()
    assert any(_under(m, "qins.integrations.transformers") for m in found)  # the scan sees imports in functions
    outside = {m: lines for m, lines in found.items() if not any(_under(m, p) for p in TRANSFORMERS_USERS)}
    assert outside == {}


def test_the_integration_modules_stay_small() -> None:
    """The transformers integration is split by concern (registration, config, quantizer, load)."""
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()
             if _under(m, "qins.integrations.transformers") and not m.endswith(".compat")}
    assert {m: n for m, n in sizes.items() if n > 300} == {}


def _child(code: str) -> subprocess.CompletedProcess:
    env = child_environ(dict(os.environ, PYTHONPATH=str(ROOT)))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_core_modules_together_import_without_transformers() -> None:
    proc = _child(f"import importlib, sys; [importlib.import_module(m) for m in {CORE!r}]; "
                  "print('transformers' in sys.modules, 'accelerate' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.slow  # ten fresh interpreters
def test_each_core_module_imports_alone_without_transformers() -> None:
    # one fresh interpreter per module: each is imported alone (a module that needs another to be
    # imported first, or pulls transformers in, shows up here)
    script = "import importlib, sys; importlib.import_module(sys.argv[1]); print('transformers' in sys.modules)"
    failures = {}
    for module in CORE:
        env = child_environ(dict(os.environ, PYTHONPATH=str(ROOT)))
        proc = subprocess.run([sys.executable, "-c", script, module], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0 or proc.stdout.split() != ["False"]:
            failures[module] = (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert failures == {}


# transformers and accelerate as if not installed: every finder on sys.meta_path is wrapped so that
# it finds neither (importlib.util.find_spec returns None, an import raises ModuleNotFoundError)
BLOCK_TRANSFORMERS = r"""
import importlib.abc, sys

class Missing(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in ("transformers", "accelerate"):
            return None
        find = getattr(self.inner, "find_spec", None)
        return None if find is None else find(fullname, path, target)

    def __getattr__(self, name):  # invalidate_caches, find_distributions, ...
        return getattr(self.inner, name)

sys.meta_path[:] = [Missing(f) for f in sys.meta_path]
try:
    import transformers
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("transformers was not hidden")
"""

WITHOUT_TRANSFORMERS = BLOCK_TRANSFORMERS + r"""
import tempfile, os
import torch
import qins

layer = torch.nn.Linear(16, 8)
model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(8, 4))
report = qins.convert_model_to_projective(model, cache_weight=False)
x = torch.randn(3, 16)
y = model(x)
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "m.safetensors")
    qins.save(model, path)
    skeleton = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    loaded = qins.load(skeleton, path)
assert torch.equal(loaded(x), y)
print(len(report.converted), "transformers" in sys.modules)
"""


@pytest.mark.slow  # a fresh interpreter converts, saves and loads a small model
def test_import_qins_works_without_transformers_for_the_codec_the_layer_and_save_load() -> None:
    proc = _child(WITHOUT_TRANSFORMERS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["2", "False"]
