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
def module():
    spec = importlib.util.spec_from_file_location(
        "qins_mutation_report", Path(__file__).parents[1] / "docs" / "mutation.py"
    )
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)  # type: ignore[union-attr]
    return loaded


@pytest.fixture
def report(module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(module, "_status", lambda code: _STATUS[code])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mutants" / "qins").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "mutants" / "qins" / "m.py").write_text(_MODULE)

    def run(
        codes: dict[int, object], listed: dict[int, str], capsys: pytest.CaptureFixture
    ) -> tuple[dict[str, str], str, int]:
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
    assert (row["generated"], row["detected"], row["equivalent"], row["gpu_only"], row["not_checked"]) == (
        "4",
        "1",
        "1",
        "1",
        "1",
    )
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


def _meta(*codes: object) -> dict:
    """A result file as mutmut 3.8 writes it (every key its loader requires)."""
    keys = [f"qins.m.x_f__mutmut_{i}" for i in range(1, len(codes) + 1)]
    return {"exit_code_by_key": dict(zip(keys, codes)), "hash_by_function_name": {"x_f": "abc"},
            "type_check_error_by_key": {}, "durations_by_key": {k: 0.5 for k in keys},
            "estimated_durations_by_key": {k: 1.5 for k in keys}}


def test_the_ledger_carries_mutmuts_results_to_a_fresh_clone_and_never_overwrites_a_local_one(
    module, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = {Path("qins/m.py.meta"): _meta(1, 0, None), Path("qins/kernels/k.py.meta"): _meta(1)}
    for rel, meta in run.items():
        (Path("mutants") / rel).parent.mkdir(parents=True, exist_ok=True)
        (Path("mutants") / rel).write_text(json.dumps(meta))
    assert sorted(module.save_ledger()) == sorted(run)
    assert {rel: json.loads((module.LEDGER / rel).read_text()) for rel in run} == run
    fresh = tmp_path / "clone"  # a fresh clone: the ledger, no mutants/
    (fresh / "docs").mkdir(parents=True)
    Path("docs/mutation-ledger").rename(fresh / "docs" / "mutation-ledger")
    monkeypatch.chdir(fresh)
    local = _meta(1, 1, 1)
    (Path("mutants") / "qins").mkdir(parents=True)
    (Path("mutants") / "qins" / "m.py.meta").write_text(json.dumps(local))  # newer than the ledger's
    assert module.restore_ledger() == [Path("qins/kernels/k.py.meta")]
    assert json.loads(Path("mutants/qins/kernels/k.py.meta").read_text()) == run[Path("qins/kernels/k.py.meta")]
    assert json.loads(Path("mutants/qins/m.py.meta").read_text()) == local


def test_saving_drops_modules_the_run_no_longer_has_and_a_run_without_results_leaves_the_ledger_alone(
    module, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    old = module.LEDGER / "qins" / "gone.py.meta"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(_meta(1)))
    assert module.save_ledger() == [] and old.exists()  # no mutants/ at all: nothing touched
    (Path("mutants") / "qins").mkdir(parents=True)
    (Path("mutants") / "qins" / "m.py.meta").write_text(json.dumps(_meta(0)))
    assert module.save_ledger() == [Path("qins/m.py.meta")]
    assert not old.exists() and (module.LEDGER / "qins" / "m.py.meta").exists()
