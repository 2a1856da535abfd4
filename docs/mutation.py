"""The mutation score of ``pytest tests`` over ``qins/``, per module, from a finished ``mutmut run``.

    nox -s mutation                      # runs mutmut, then this report with --check
    python docs/mutation.py [--check]    # after `mutmut run`, from the repository root
    python docs/mutation.py --restore-ledger | --save-ledger   # mutmut's verdicts <-> the committed ledger

Reads mutmut's results (``mutants/qins/**.py.meta``) and the committed list of equivalent
mutants (``tests/mutation_equivalents.txt``: ``<mutant name> | <the mutated line> | <reason>``).
An entry whose mutant no longer exists, or whose mutated line no longer matches ``mutmut show``'s
diff, is *stale*: the source moved under it and it must be re-checked by hand.

Score = detected / (generated - equivalent), detected = killed + timeout + crashed (a mutant
that makes the suite hang or segfault is caught). Entries whose reason starts with "needs a GPU"
are not equivalent: they are mutants only a second real device can kill (the suite's CUDA
parametrisations do); they are shown as ``gpu_only`` and count as undetected here. Likewise
"needs transformers 4.x" (``tf4_only``): code that runs only under transformers 4.x, which the
version matrix (``nox``) tests and mutmut's venv (5.x) does not. So do entries whose
reason starts with "untestable under mutmut" (``untestable``): a test could tell them apart, but not
through mutmut's trampolines (e.g. a warning's ``stacklevel``, which the trampoline's frame shifts).
``--check`` exits 1 when the score is below 95%, when any mutant is left unchecked, or when the
equivalents list has stale entries.
Prints Markdown; no other side effects.

**The ledger** (``docs/mutation-ledger/qins/**.py.meta``, committed): mutmut's own per-module result
files, so that a fresh clone continues the last run instead of starting over (``mutants/`` is not
committed). ``--restore-ledger`` copies them into ``mutants/`` where no local result file exists;
mutmut then regenerates each module's mutants and keeps a verdict only for functions whose source
hash is unchanged (its own cache rule: a changed function's mutants are checked again).
``--save-ledger`` writes ``mutants/``' result files back (sorted keys, one entry a line).
``nox -s mutation`` does both around ``mutmut run``.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

TARGET = 0.95
EQUIVALENTS = Path("tests/mutation_equivalents.txt")
LEDGER = Path("docs/mutation-ledger")
DETECTED = {"killed", "timeout", "segfault"}
#: reasons that list a mutant a test can tell apart, but not under mutmut (counted as undetected)
UNTESTABLE = "untestable under mutmut"
#: listed mutants that are *not* equivalent, by the prefix of their reason: the column they are
#: shown in; all count as undetected
NOT_EQUIVALENT = (("needs a GPU", "gpu_only"), ("needs transformers 4.x", "tf4_only"), (UNTESTABLE, "untestable"))


def _status(code: object) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def load_equivalents(path: Path = EQUIVALENTS) -> dict[str, tuple[str, str]]:
    """``{mutant name: (mutated line, reason)}`` from the committed list (``#`` starts a comment)."""
    out: dict[str, tuple[str, str]] = {}
    for n, raw in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(" | ", 2)]
        if len(parts) != 3 or not all(parts):
            raise SystemExit(f"{path}:{n}: expected '<mutant> | <mutated line> | <reason>', got {raw!r}")
        out[parts[0]] = (parts[1], parts[2])
    return out


_FUNCTIONS: dict[Path, dict[str, list[str]]] = {}


def _functions(path: Path) -> dict[str, list[str]]:
    """``{function name: its source lines}`` of a mutmut-generated module (parsed once)."""
    if path not in _FUNCTIONS:
        import ast

        src = path.read_text()
        lines = src.splitlines()
        _FUNCTIONS[path] = {
            node.name: lines[node.lineno - 1: node.end_lineno]
            for node in ast.walk(ast.parse(src)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
    return _FUNCTIONS[path]


def _mutated_line(name: str, root: Path = Path("mutants")) -> str:
    """The lines a mutant adds, joined by " / " (as ``mutmut show`` prints them, ``+`` removed).

    Read from mutmut's generated module: the mutant's function against its ``__mutmut_orig`` copy.
    """
    import difflib

    module, func = name.rsplit(".", 1)
    stem = root / Path(*module.split("."))
    path = stem.with_suffix(".py") if stem.with_suffix(".py").exists() else stem / "__init__.py"
    functions = _functions(path) if path.exists() else {}
    base = func.rsplit("__mutmut_", 1)[0]
    orig, mutant = functions.get(base + "__mutmut_orig"), functions.get(func)
    if orig is None or mutant is None:
        return ""
    plain = base.split("\u01c1")[-1] if "\u01c1" in base else base[len("x_"):]  # x_f -> f, x<C>m -> m
    orig = [orig[0].replace(f"def {base}__mutmut_orig(", f"def {plain}(", 1), *orig[1:]]
    mutant = [mutant[0].replace(f"def {func}(", f"def {plain}(", 1), *mutant[1:]]
    diff = difflib.unified_diff(orig, mutant, lineterm="", n=0)
    return " / ".join(ln[1:].strip() for ln in diff if ln.startswith("+") and not ln.startswith("+++"))


def results(root: Path = Path("mutants")) -> dict[str, dict[str, str]]:
    """``{module path: {mutant name: status}}`` for every mutated module under ``root/qins``."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted((root / "qins").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[str(meta.relative_to(root))[: -len(".meta")]] = {k: _status(v) for k, v in codes.items()}
    return out


def _metas(root: Path) -> dict[Path, Path]:
    """``{path relative to root: path}`` of every mutmut result file of ``qins`` under ``root``."""
    return {m.relative_to(root): m for m in sorted((root / "qins").rglob("*.py.meta"))}


def restore_ledger(ledger: Path = LEDGER, root: Path = Path("mutants")) -> list[Path]:
    """Copy the ledger's result files into ``root`` where ``root`` has none; returns those copied.

    A local result file is never overwritten: it is at least as new as the committed one.
    """
    copied = []
    for rel, src in _metas(ledger).items():
        dst = root / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text())
            copied.append(rel)
    return copied


def save_ledger(root: Path = Path("mutants"), ledger: Path = LEDGER) -> list[Path]:
    """Write ``root``'s result files to the ledger (sorted keys, one entry a line); returns them.

    Ledger files of modules that ``root`` no longer has are removed, so the ledger mirrors the run.
    With no results under ``root`` (mutmut never got as far) the ledger is left as it is.
    """
    metas = _metas(root)
    if not metas:
        return []
    for rel, stale in _metas(ledger).items():
        if rel not in metas:
            stale.unlink()
    for rel, src in metas.items():
        dst = ledger / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(json.loads(src.read_text()), sort_keys=True, indent=0) + "\n")
    return list(metas)


def main(argv: list[str]) -> int:
    if "--restore-ledger" in argv or "--save-ledger" in argv:
        done = restore_ledger() if "--restore-ledger" in argv else save_ledger()
        verb = "restored into mutants/" if "--restore-ledger" in argv else f"saved to {LEDGER}/"
        print(f"{len(done)} mutmut result files {verb}")
        return 0
    check = "--check" in argv
    equivalents = load_equivalents()
    by_module = results()
    if not by_module:
        print("no mutmut results under mutants/: run `mutmut run` (or `nox -s mutation`) first")
        return 1
    stale = []
    for name, (line, _) in equivalents.items():
        known = any(name in m for m in by_module.values())
        if not known or _mutated_line(name) != line:
            stale.append(name)
    rows, total = [], Counter()
    for module, statuses in by_module.items():
        c = Counter()
        for name, status in statuses.items():
            c["generated"] += 1
            if status == "not checked":  # listed or not: only mutmut's run of its tests decides
                c["not_checked"] += 1
            elif name in equivalents and name not in stale and status not in DETECTED:
                reason = equivalents[name][1]
                c[next((col for prefix, col in NOT_EQUIVALENT if reason.startswith(prefix)), "equivalent")] += 1
            elif status in DETECTED:
                c["detected"] += 1
            else:
                c[status.replace(" ", "_")] += 1
        total.update(c)
        rows.append((module, c))
    cols = [
        "generated",
        "detected",
        "equivalent",
        "gpu_only",
        "tf4_only",
        "untestable",
        "survived",
        "no_tests",
        "not_checked",
        "suspicious",
        "skipped",
    ]
    print("| module | " + " | ".join(cols) + " | score |")
    print("|---" * (len(cols) + 2) + "|")

    def score(c: Counter) -> float:
        denominator = c["generated"] - c["equivalent"]
        return c["detected"] / denominator if denominator else 1.0  # gpu_only, tf4_only, untestable stay in it

    for module, c in rows + [("**all**", total)]:
        print(f"| {module} | " + " | ".join(str(c[k]) for k in cols) + f" | {100 * score(c):.1f}% |")
    undetected = sorted(
        name for statuses in by_module.values() for name, s in statuses.items()
        if s not in DETECTED and s != "not checked" and not (name in equivalents and name not in stale)
    )
    killed_but_listed = sorted(
        name for statuses in by_module.values() for name, s in statuses.items() if s in DETECTED and name in equivalents
    )
    if undetected:
        print(f"\n{len(undetected)} undetected (not killed, not listed as equivalent):")
        for name in undetected:
            print(f"- {name}")
    if killed_but_listed:
        print(f"\n{len(killed_but_listed)} listed in {EQUIVALENTS} but killed (remove them):")
        for name in killed_but_listed:
            print(f"- {name}")
    if stale:
        print(f"\n{len(stale)} stale entries in {EQUIVALENTS} (re-check them by hand):")
        for name in stale:
            print(f"- {name}")
    unchecked = total["not_checked"]
    if unchecked:
        checked = Counter(total)
        checked["generated"] -= unchecked
        print(f"\n{unchecked} mutants not checked yet; over the {checked['generated']} checked: "
              f"score {100 * score(checked):.2f}%")
    ok = score(total) >= TARGET and not stale and not unchecked and not killed_but_listed
    print(f"\nscore {100 * score(total):.2f}% (target >= {100 * TARGET:.0f}%): {'met' if ok else 'NOT met'}")
    return 0 if ok or not check else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
