"""Mutation testing of the native CPU kernels (``qins/kernels/cpu/*.cpp``, ``*.h``): mutmut mutates
only Python, so this plants small C++ faults one at a time and checks that the kernel tests fail.

    python -m tests.cpp_mutation --list [--file isa_avx2.cpp]           # the mutants, no build
    python -m tests.cpp_mutation --sample 60 --seed 1                   # build and test 60 of them
    python -m tests.cpp_mutation --mutant 'isa_avx512.cpp:426:...'      # one by its id (again)
    python -m tests.cpp_mutation --report-only                           # rewrite the summary

The operators (:func:`mutants`), each applied at one place of code (comments, string literals and
preprocessor lines are left alone): ``+`` <-> ``-``; ``<`` <-> ``<=`` and ``>`` <-> ``>=`` (not
template brackets, shifts or ``->``); ``==`` <-> ``!=``; ``&&`` <-> ``||``; an integer literal + 1
and - 1; ``+=`` -> ``=`` (the accumulation dropped; not in a ``for`` header, where it only hangs);
the SIMD intrinsics' ``add`` <-> ``sub``, ``min`` <-> ``max`` (also ``std::``) and the strict <->
non-strict compare predicates (``_CMP_LT_OQ`` <-> ``_CMP_LE_OQ``, ``_CMP_GT_OQ`` <-> ``_CMP_GE_OQ``).

Each run works on a copy: ``qins/``, ``tests/`` and the pytest configuration are copied into a
temporary directory (the working tree is never written), the C++ sources taken as committed at
``--rev`` (HEAD), and the copy's extension is built there in
its own ``TORCH_EXTENSIONS_DIR``. The copy's ``build.py`` names the build directory once for the
run instead of after the sources' hash, so a mutant of one ISA unit recompiles that unit only and
relinks against the unmutated ``ops.o`` (ops.cpp alone takes ~25 s on two cores); a mutant of
``ops.cpp`` rebuilds ``ops.o``, one of the header every object. The unmutated copy is built and
tested first: the selection must pass on it at every ISA, or the run stops.

Per mutant: build (a failure is ``build-failed``, and is not counted), then the test selection
(:data:`SELECTION`, ``-x``, the Hypothesis ``ci`` profile: derandomized, no database) once per ISA
the mutated file serves (:data:`FILE_ISAS`, through ``QINS_CPU_ISA``), with ``QINS_KERNEL=native``
so that a module that fails to load is an error rather than a silent fall back to the reference.
The first failing ISA kills it (``killed``; a run past ``--timeout`` is ``timeout``, a crash
``crashed``: all detected); passing every ISA, it ``survived``. Results are merged into
``docs/cpp_mutation.json`` by mutant id (a file whose source changed since drops its old entries),
and ``docs/cpp_mutation.md`` summarises them. A survivor is either killed by a new test or listed
in ``tests/cpp_mutation_equivalents.txt`` as ``<mutant id> | <the mutated line> | <why no test can
tell>``; kill rate = detected / (built - equivalent). An entry whose mutated line no longer matches
is stale (``--check`` fails then, or below 95%).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_DIR = Path("qins/kernels/cpu")
#: the mutated sources, and the ISA paths (``QINS_CPU_ISA``) each one's code serves; "auto" leaves
#: ``QINS_CPU_ISA`` unset (the best path of this CPU, through ``best_isa``)
FILE_ISAS: dict[str, tuple[str, ...]] = {
    "isa_scalar.cpp": ("scalar",),
    "isa_avx2.cpp": ("avx2",),
    "isa_avx512.cpp": ("avx512",),
    "ops.cpp": ("auto", "scalar", "avx2"),
    "qins_kernels.h": ("auto", "scalar", "avx2"),
}
#: tests that read ``QINS_CPU_ISA`` as unset: left out where it is set
AUTO_ONLY = ("tests/test_kernels.py::test_backend_name",)
#: the kernel tests run against each mutant (fast ones; the slow 11008-wide layers included), and the
#: shared tables' (their op refusals and batch paths at every ISA: without them the op's row_table checks
#: survived every mutant)
SELECTION = ("tests/test_cpp_paths.py", "tests/test_search_kernel.py", "tests/test_kernels.py",
             "tests/test_shared_tables.py")
REPORT = ROOT / "docs" / "cpp_mutation.json"
SUMMARY = ROOT / "docs" / "cpp_mutation.md"
EQUIVALENTS = ROOT / "tests" / "cpp_mutation_equivalents.txt"
TARGET = 0.95
DETECTED = ("killed", "timeout", "crashed")
BUILD_NAME = "qins_cpu_mutation"


@dataclasses.dataclass(frozen=True)
class Mutant:
    file: str
    offset: int  # of the replaced text in the file
    line: int  # 1-based
    col: int  # 1-based
    original: str
    replacement: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.col}:{self.original}->{self.replacement}"

    def apply(self, source: str) -> str:
        end = self.offset + len(self.original)
        assert source[self.offset:end] == self.original, f"{self.id}: the source moved"
        return source[:self.offset] + self.replacement + source[end:]

    def mutated_line(self, source: str) -> str:
        return self.apply(source).splitlines()[self.line - 1].strip()


# ---------------------------------------------------------------------------------------------
# The operators
# ---------------------------------------------------------------------------------------------


def code_mask(source: str) -> list[bool]:
    """Per character: True where it is code (not a comment, string or char literal, nor a
    preprocessor line)."""
    mask = [True] * len(source)
    i, n = 0, len(source)
    line_start = True
    while i < n:
        c = source[i]
        if line_start and c == "#":
            j = source.find("\n", i)
            j = n if j < 0 else j
            mask[i:j] = [False] * (j - i)
            i = j
            continue
        if c == "\n":
            line_start = True
            i += 1
            continue
        if not c.isspace():
            line_start = False
        if source.startswith("//", i):
            j = source.find("\n", i)
            j = n if j < 0 else j
        elif source.startswith("/*", i):
            j = source.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and source[j] != c:
                j += 2 if source[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        mask[i:j] = [False] * (j - i)
        i = j
    return mask


# ``template <...>`` and ``name<args>`` (no space before the ``<``, arguments of names, numbers, ``*``,
# ``,``, ``::`` only): angle brackets, not comparisons.
_TEMPLATE = re.compile(r"template\s*<[^<>]*>|(?<=[\w])<(?:[\w:\s\*,]|&(?!&))*>")
_FOR_HEADER = re.compile(r"\bfor\s*\(")

# (regex, replacements of the matched text); the match must lie wholly in code.
_OPERATORS: list[tuple[re.Pattern[str], dict[str, tuple[str, ...]] | None]] = [
    (re.compile(r"(?<![+\-=<>!&|*/%^])[+\-](?![+\-=>])"), {"+": ("-",), "-": ("+",)}),
    (re.compile(r"<=|>=|(?<![<\-])<(?![<=])|(?<![>\-])>(?![>=])"),
     {"<": ("<=",), "<=": ("<",), ">": (">=",), ">=": (">",)}),
    (re.compile(r"==|!="), {"==": ("!=",), "!=": ("==",)}),
    (re.compile(r"&&|\|\|"), {"&&": ("||",), "||": ("&&",)}),
    (re.compile(r"(?<![\w.])\d+(?![\w.])"), None),  # integer literals: +1 and -1
    (re.compile(r"\+="), {"+=": ("=",)}),
    (re.compile(r"(?<=_mm_)(?:add|sub)(?=_)|(?<=_mm256_)(?:add|sub)(?=_)|(?<=_mm512_)(?:add|sub)(?=_)"),
     {"add": ("sub",), "sub": ("add",)}),
    (re.compile(r"(?<=_mm_)(?:min|max)(?=_)|(?<=_mm256_)(?:min|max)(?=_)|(?<=_mm512_)(?:min|max)(?=_)|(?<=std::)(?:min|max)\b"),
     {"min": ("max",), "max": ("min",)}),
    (re.compile(r"_CMP_(?:LT|LE|GT|GE)_OQ"),
     {"_CMP_LT_OQ": ("_CMP_LE_OQ",), "_CMP_LE_OQ": ("_CMP_LT_OQ",), "_CMP_GT_OQ": ("_CMP_GE_OQ",),
      "_CMP_GE_OQ": ("_CMP_GT_OQ",)}),
]


def _float_exponent_sign(source: str, i: int) -> bool:
    """Whether the ``+``/``-`` at ``i`` is a float literal's exponent sign (``2.1e-4f``)."""
    return i >= 2 and source[i - 1] in "eE" and (source[i - 2].isdigit() or source[i - 2] == ".")


def _in_for_header(source: str, i: int) -> bool:
    line_start = source.rfind("\n", 0, i) + 1
    heads = list(_FOR_HEADER.finditer(source, line_start, i))
    if not heads:
        return False
    head = source[heads[-1].end():i]
    return head.count("(") >= head.count(")")


def mutants(source: str, file: str) -> list[Mutant]:
    """Every mutant of ``source`` (the text of ``file``), in source order: deterministic, each one
    replacement of one operator or literal at one place."""
    mask = code_mask(source)
    angle = set()
    for m in _TEMPLATE.finditer(source):
        angle.add(m.start() if source[m.start()] == "<" else source.index("<", m.start()))
        angle.add(m.end() - 1)
    line_starts = [0] + [i + 1 for i, c in enumerate(source) if c == "\n"]
    found: dict[tuple[int, str, str], Mutant] = {}
    for regex, table in _OPERATORS:
        for m in regex.finditer(source):
            start, text = m.start(), m.group()
            if not all(mask[start:m.end()]):
                continue
            if text in "<>" and start in angle or text in "+-" and _float_exponent_sign(source, start):
                continue
            if text == "+=" and _in_for_header(source, start):
                continue
            if table is None:
                value = int(text)
                options: tuple[str, ...] = (str(value + 1),) + ((str(value - 1),) if value > 0 else ())
            else:
                options = table[text]
            line = _line_of(line_starts, start)
            for new in options:
                found[(start, text, new)] = Mutant(file, start, line + 1, start - line_starts[line] + 1, text, new)
    return [found[k] for k in sorted(found)]


def _line_of(line_starts: list[int], offset: int) -> int:
    lo, hi = 0, len(line_starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if line_starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo


def all_mutants(sources: dict[str, str], files: list[str]) -> list[Mutant]:
    return [m for f in files for m in mutants(sources[f], f)]


def committed_sources(rev: str = "HEAD") -> dict[str, str]:
    """The C++ sources as committed at ``rev``: a run is of a commit, whatever the working tree holds
    (other work in progress on a kernel file is neither mutated nor needed to pass)."""
    return {f: _git_show(f"{rev}:{(CPU_DIR / f).as_posix()}") for f in FILE_ISAS}


def last_run_commit(report: Path = REPORT) -> str:
    """The commit of the report's last run (HEAD without one): the sources its mutant ids refer to."""
    runs = json.loads(report.read_text()).get("runs", []) if report.exists() else []
    return runs[-1]["commit"] if runs else "HEAD"


def _git_show(spec: str) -> str:
    return subprocess.run(["git", "show", spec], cwd=ROOT, capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Workspace:
    """A copy of the package and its tests in a temporary directory, and its isolated build."""

    def __init__(self, root: Path, sources: dict[str, str], timeout_s: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qins-cpp-mutation-"))
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
        shutil.copytree(root / "qins", self.dir / "qins", ignore=ignore)
        shutil.copytree(root / "tests", self.dir / "tests", ignore=ignore)
        for name in ("conftest.py", "pytest.ini"):
            shutil.copy2(root / name, self.dir / name)
        build_py = self.dir / CPU_DIR / "build.py"
        text = build_py.read_text()
        fixed = text.replace('f"qins_cpu_{_digest()}"', f'"{BUILD_NAME}"')
        assert fixed != text, "qins/kernels/cpu/build.py no longer names its directory f'qins_cpu_{_digest()}'"
        build_py.write_text(fixed)
        self.ext = self.dir / "extensions"
        self.build = self.ext / BUILD_NAME
        self.pristine = self.dir / "pristine-build"
        self.src = self.dir / CPU_DIR
        self.sources = dict(sources)
        for f, text in self.sources.items():
            (self.src / f).write_text(text)
        self.mtimes = {f: (self.src / f).stat().st_mtime_ns for f in FILE_ISAS}
        self.timeout_s = timeout_s
        self.env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(self.ext), PYTHONPATH=str(self.dir),
                        HYPOTHESIS_PROFILE="ci", QINS_KERNEL="native", PYTHONDONTWRITEBYTECODE="1")
        self.env.pop("QINS_CPU_ISA", None)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _build(self) -> tuple[bool, str, float]:
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", "from qins.kernels.cpu import build; build.load_native()"],
                                  cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return False, "build timed out", time.perf_counter() - start
        return proc.returncode == 0, (proc.stderr or proc.stdout)[-600:], time.perf_counter() - start

    def baseline(self) -> dict:
        ok, log, build_s = self._build()
        if not ok:
            raise SystemExit(f"the unmutated copy does not build:\n{log}")
        shutil.copytree(self.build, self.pristine)  # copy2: the objects keep their mtimes
        runs = {}
        for isa in FILE_ISAS["ops.cpp"]:
            status, detail, secs = self.tests(isa)
            if status != "passed":
                raise SystemExit(f"the test selection fails on the unmutated code at {isa}: {detail}")
            runs[isa] = round(secs, 1)
        return {"build_s": round(build_s, 1), "tests_s": runs}

    def tests(self, isa: str) -> tuple[str, str, float]:
        """``(passed | killed | timeout | crashed, detail, seconds)`` of the selection at ``isa``."""
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--run-slow", "-W",
               "ignore::DeprecationWarning", *SELECTION]
        env = dict(self.env)
        if isa != "auto":
            env["QINS_CPU_ISA"] = isa
            cmd += [f"--deselect={t}" for t in AUTO_ONLY]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=self.dir, env=env, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout", f"{isa}: past {self.timeout_s:.0f} s", time.perf_counter() - start
        secs = time.perf_counter() - start
        if proc.returncode == 0:
            return "passed", "", secs
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
        if proc.returncode < 0 or not failed and "Fatal Python error" in proc.stderr + proc.stdout:
            return "crashed", f"{isa}: exit {proc.returncode}", secs
        return "killed", f"{isa}: {failed[0] if failed else proc.stdout.strip().splitlines()[-1:]}", secs

    def run(self, mutant: Mutant) -> dict:
        path = self.src / mutant.file
        path.write_text(mutant.apply(self.sources[mutant.file]))
        shutil.rmtree(self.build, ignore_errors=True)
        shutil.copytree(self.pristine, self.build)
        for so in self.build.glob("*.so"):
            so.unlink()
        stale = [p.name for p in self.build.glob("*.o")] if mutant.file == "qins_kernels.h" else [
            Path(mutant.file).stem + ".o"]
        for name in stale:
            (self.build / name).unlink(missing_ok=True)
        entry = {"id": mutant.id, "file": mutant.file, "line": mutant.line, "original": mutant.original,
                 "replacement": mutant.replacement, "mutated_line": mutant.mutated_line(self.sources[mutant.file])}
        try:
            ok, log, build_s = self._build()
            entry["build_s"] = round(build_s, 1)
            if not ok:
                last = log.strip().splitlines()
                entry.update(status="build-failed", detail=last[-1][:200] if last else "")
                return entry
            entry["status"], entry["detail"], total = "survived", "", 0.0
            for isa in FILE_ISAS[mutant.file]:
                status, detail, secs = self.tests(isa)
                total += secs
                if status != "passed":
                    entry["status"], entry["detail"] = status, detail
                    break
            entry["tests_s"] = round(total, 1)
            return entry
        finally:
            path.write_text(self.sources[mutant.file])
            os.utime(path, ns=(self.mtimes[mutant.file], self.mtimes[mutant.file]))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def load_equivalents(path: Path = EQUIVALENTS) -> dict[str, tuple[str, str]]:
    """``{mutant id: (mutated line, reason)}`` from the ledger (``#`` comments and blank lines skipped).

    Fields are split on the first and the last `` | ``: a mutated line may hold `` | `` (C++'s bitwise or),
    a reason may not."""
    out: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return out
    for raw in path.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        ident, rest = raw.split(" | ", 1)
        line, reason = rest.rsplit(" | ", 1)
        ident, line, reason = ident.strip(), line.strip(), reason.strip()
        out[ident] = (line, reason)
    return out


def score(report: dict, equivalents: dict[str, tuple[str, str]]) -> dict:
    """Counts and the kill rate over built, non-equivalent mutants; stale and unneeded ledger entries."""
    entries = report.get("mutants", {})
    counts = Counter(e["status"] for e in entries.values())
    equivalent = [i for i, e in entries.items() if e["status"] == "survived" and i in equivalents
                  and equivalents[i][0] == e["mutated_line"]]
    stale = sorted(i for i in equivalents if i in entries and equivalents[i][0] != entries[i]["mutated_line"])
    unneeded = sorted(i for i in equivalents if i in entries and entries[i]["status"] in DETECTED)
    built = sum(v for k, v in counts.items() if k != "build-failed")
    detected = sum(counts[k] for k in DETECTED)
    denominator = built - len(equivalent)
    return {"tested": len(entries), "built": built, "build_failed": counts["build-failed"], "detected": detected,
            "killed": counts["killed"], "timeout": counts["timeout"], "crashed": counts["crashed"],
            "survived": counts["survived"], "equivalent": len(equivalent),
            "undetected": counts["survived"] - len(equivalent),
            "kill_rate": detected / denominator if denominator else None, "stale": stale, "unneeded": unneeded}


def summary_markdown(report: dict, equivalents: dict[str, tuple[str, str]]) -> str:
    s = score(report, equivalents)
    rate = "n/a" if s["kill_rate"] is None else f"{100 * s['kill_rate']:.1f}%"
    lines = [
        "# C++ mutation testing of the native CPU kernels",
        "",
        "_Generated by `python -m tests.cpp_mutation` (see its docstring for the operators and the run);"
        " the per-mutant results are in [cpp_mutation.json](cpp_mutation.json), the equivalent mutants in"
        " [tests/cpp_mutation_equivalents.txt](../tests/cpp_mutation_equivalents.txt)._",
        "",
        f"- Kill rate (detected / (built - equivalent)): **{rate}** (target {100 * TARGET:.0f}%)",
        f"- Mutants tested: {s['tested']}; built {s['built']}, build failed {s['build_failed']}",
        f"- Detected {s['detected']} (killed {s['killed']}, timeout {s['timeout']}, crashed {s['crashed']}); "
        f"survived {s['survived']}, of which equivalent {s['equivalent']}, undetected {s['undetected']}",
        "",
        "## Runs",
        "",
        "| started (UTC) | commit | command | CPU | mutants | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for run in report.get("runs", []):
        lines.append(f"| {run['started']} | {run['commit']} | "
                     f"`{run['command']}` | {run['cpu']} | {run['mutants']} | {run['wall_s'] / 60:.1f} min |")
    by_file = Counter()
    for e in report.get("mutants", {}).values():
        by_file[(e["file"], e["status"])] += 1
    lines += ["", "## Per file", "", "| file | killed | timeout | crashed | survived | build failed |",
              "|---|---|---|---|---|---|"]
    for f in FILE_ISAS:
        if any(k[0] == f for k in by_file):
            lines.append(f"| {f} | " + " | ".join(str(by_file[(f, st)]) for st in
                                                 ("killed", "timeout", "crashed", "survived", "build-failed")) + " |")
    survivors = [e for e in report.get("mutants", {}).values() if e["status"] == "survived"]
    if survivors:
        lines += ["", "## Survivors", "", "| mutant | mutated line | verdict |", "|---|---|---|"]
        for e in sorted(survivors, key=lambda e: e["id"]):
            eq = equivalents.get(e["id"])
            verdict = f"equivalent: {eq[1]}" if eq and eq[0] == e["mutated_line"] else "**undetected**"
            lines.append(f"| `{e['id']}` | `{e['mutated_line']}` | {verdict} |")
    if s["stale"]:
        lines += ["", "Stale ledger entries (the mutated line moved): " + ", ".join(f"`{i}`" for i in s["stale"])]
    return "\n".join(lines) + "\n"


def _load_report(path: Path, sources: dict[str, str]) -> dict:
    report = json.loads(path.read_text()) if path.exists() else {"runs": [], "mutants": {}, "sources": {}}
    # entries of a file whose source changed since describe other code: dropped
    now = {f: _digest(text) for f, text in sources.items()}
    keep = {f for f, d in report.get("sources", {}).items() if now.get(f) == d}
    report["mutants"] = {i: e for i, e in report.get("mutants", {}).items() if e["file"] in keep}
    report["sources"] = now
    return report


def _write(report: dict, path: Path, summary: Path) -> None:
    report["mutants"] = dict(sorted(report["mutants"].items()))
    path.write_text(json.dumps(report, indent=1) + "\n")
    summary.write_text(summary_markdown(report, load_equivalents()))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cpp_mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", action="append", choices=sorted(FILE_ISAS), help="only this source (repeatable)")
    parser.add_argument("--mutant", action="append", default=[], help="only this mutant id (repeatable)")
    parser.add_argument("--sample", type=int, help="a random sample of this many mutants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rev", help="the commit whose C++ sources are mutated (default HEAD; with --report-only "
                        "or --check, the last run's)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--skip-done", action="store_true", help="leave out mutants the report already has "
                        "(after --sample: the rest of the same sample)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per test run before it counts as a hang")
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--summary", type=Path, default=SUMMARY)
    parser.add_argument("--report-only", action="store_true", help="rewrite the summary from the report")
    parser.add_argument("--check", action="store_true", help="exit 1 below the target, or with stale ledger entries")
    args = parser.parse_args(argv)

    if args.rev is None:
        args.rev = last_run_commit(args.report) if args.report_only or args.check else "HEAD"
    sources = committed_sources(args.rev)
    files = args.file or list(FILE_ISAS)
    report = _load_report(args.report, sources)
    if args.report_only or args.check:
        _write(report, args.report, args.summary)
        s = score(report, load_equivalents())
        print(json.dumps({k: v for k, v in s.items()}, indent=1))
        ok = s["kill_rate"] is not None and s["kill_rate"] >= TARGET and not s["stale"]
        return 0 if ok or not args.check else 1
    chosen = all_mutants(sources, files)
    if args.mutant:
        wanted = set(args.mutant)
        chosen = [m for m in chosen if m.id in wanted]
        missing = wanted - {m.id for m in chosen}
        if missing:
            parser.error(f"no such mutant: {sorted(missing)}")
    if args.sample is not None and args.sample < len(chosen):
        # in the sample's random order: a run cut short is still a sample of every file
        chosen = [chosen[i] for i in random.Random(args.seed).sample(range(len(chosen)), args.sample)]
    if args.skip_done:  # after sampling: the rest of the same sample
        chosen = [m for m in chosen if m.id not in report["mutants"]]
    if args.list:
        for m in chosen:
            print(m.id, "|", m.mutated_line(sources[m.file]))
        print(f"{len(chosen)} mutants", file=sys.stderr)
        return 0

    started = time.perf_counter()
    run = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "commit": _git("rev-parse", "--short", args.rev),
           "command": "python -m tests.cpp_mutation " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpu": _cpu_name(), "mutants": len(chosen)}
    ws = Workspace(ROOT, sources, args.timeout)
    try:
        run["baseline"] = ws.baseline()
        print(f"baseline: {run['baseline']}", flush=True)
        for n, mutant in enumerate(chosen, 1):
            entry = ws.run(mutant)
            report["mutants"][mutant.id] = entry
            print(f"[{n}/{len(chosen)}] {entry['status']:12} {mutant.id}  {entry.get('detail', '')}", flush=True)
            run["wall_s"] = round(time.perf_counter() - started, 1)
            _write(dict(report, runs=[*report["runs"], run]), args.report, args.summary)
    finally:
        ws.close()
    run["wall_s"] = round(time.perf_counter() - started, 1)
    report["runs"].append(run)
    _write(report, args.report, args.summary)
    s = score(report, load_equivalents())
    print(json.dumps(s, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
