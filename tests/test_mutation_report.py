"""``docs/mutation.py``, the mutation score report, on a synthetic mutmut result tree.

A listed mutant counts in its column (equivalent, needs a GPU, ...) only once mutmut has run its
tests and they let it live; listed but not yet run, it is "not checked"; listed but killed, the
report asks for the entry's removal; an entry whose mutated line moved is stale.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_STATUS = {1: "killed", 0: "survived", None: "not checked"}  # mutmut.stats.status_by_exit_code's names

_MODULE = '''
def x_f__mutmut_orig(a):
    return a + 1
def x_f__mutmut_1(a):
    return a - 1
def x_f__mutmut_2(a):
    return a + 2
def x_f__mutmut_3(a):
    return a * 1
def x_f__mutmut_4(a):
    return None
'''


@pytest.fixture
def report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("qins_mutation_report", Path(__file__).parents[1] / "docs" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    monkeypatch.setattr(module, "_status", lambda code: _STATUS[code])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mutants" / "qins").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "mutants" / "qins" / "m.py").write_text(_MODULE)

    def run(codes: dict[int, object], listed: dict[int, str], capsys: pytest.CaptureFixture) -> tuple[dict[str, str], str, int]:
        meta = {"exit_code_by_key": {f"qins.m.x_f__mutmut_{k}": v for k, v in codes.items()}}
        (tmp_path / "mutants" / "qins" / "m.py.meta").write_text(json.dumps(meta))
        lines = {1: "return a - 1", 2: "return a + 2", 3: "return a * 1", 4: "return None"}
        (tmp_path / "tests" / "mutation_equivalents.txt").write_text(
            "".join(f"qins.m.x_f__mutmut_{k} | {lines[k]} | {why}\n" for k, why in listed.items()))
        rc = module.main(["--check"])
        out = capsys.readouterr().out
        header, _, row = out.splitlines()[:3]
        return dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "))), out, rc

    return run


def test_a_listed_mutant_counts_as_equivalent_only_once_mutmut_let_it_live(report, capsys) -> None:
    row, out, rc = report({1: 1, 2: 0, 3: None, 4: 0}, {2: "same value", 3: "same value", 4: "needs a GPU: x"}, capsys)
    assert (row["generated"], row["detected"], row["equivalent"], row["gpu_only"], row["not_checked"]) == ("4", "1", "1", "1", "1")
    assert row["score"] == "33.3%" and rc == 1  # 1 detected of 4 - 1 equivalent; one not checked
    assert "1 mutants not checked yet" in out


def test_all_checked_and_listed_meets_the_target_and_a_killed_listed_mutant_is_flagged(report, capsys) -> None:
    row, out, rc = report({1: 1, 2: 0, 3: 1, 4: 1}, {2: "same value"}, capsys)
    assert (row["detected"], row["equivalent"], row["not_checked"], row["score"]) == ("3", "1", "0", "100.0%")
    assert rc == 0 and "score 100.00% (target >= 95%): met" in out
    row, out, rc = report({1: 1, 2: 0, 3: 1, 4: 1}, {2: "same value", 3: "same value"}, capsys)
    assert rc == 1 and "listed in tests/mutation_equivalents.txt but killed" in out


def test_an_entry_whose_mutated_line_moved_is_stale_and_fails_the_check(report, capsys) -> None:
    (Path("mutants") / "qins" / "m.py").write_text(_MODULE.replace("return a + 2", "return a + 3"))
    row, out, rc = report({1: 1, 2: 0, 3: 1, 4: 1}, {2: "same value"}, capsys)
    assert rc == 1 and "1 stale entries" in out and row["survived"] == "1"
