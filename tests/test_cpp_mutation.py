"""``tests/cpp_mutation.py``, the C++ mutation pass: its operator generator and its score (no build)."""
from __future__ import annotations

import pytest

from tests import cpp_mutation as cm

SNIPPET = """#include <cstdint>
// a + b < c in a comment
template <int N>
float f(const float* x, int64_t n) {
  float acc = 0.0f;  // 1 + 1
  for (int64_t k = 0; k < n; k += 4) acc += x[k] * 2.5e-3f;
  if (n >= 8 && n != 3) acc = std::max<float>(acc - 1.0f, 0.0f);
  const char* s = "x < y + 1";
  return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ) ? _mm512_add_ps(a, b) : acc;
}
"""


def _sources() -> list[tuple[str, str]]:
    return list(cm.committed_sources().items())


def test_the_snippets_mutants_are_exactly_the_operators_in_its_code():
    got = [m.id for m in cm.mutants(SNIPPET, "x.cpp")]
    assert got == [
        "x.cpp:6:20:0->1",
        "x.cpp:6:25:<-><=",
        "x.cpp:6:35:4->3",
        "x.cpp:6:35:4->5",
        "x.cpp:6:42:+=->=",
        "x.cpp:7:9:>=->>",
        "x.cpp:7:12:8->7",
        "x.cpp:7:12:8->9",
        "x.cpp:7:14:&&->||",
        "x.cpp:7:19:!=->==",
        "x.cpp:7:22:3->2",
        "x.cpp:7:22:3->4",
        "x.cpp:7:36:max->min",
        "x.cpp:7:51:-->+",
        "x.cpp:9:35:_CMP_GE_OQ->_CMP_GT_OQ",
        "x.cpp:9:56:add->sub",
    ]


def test_comments_strings_preprocessor_templates_exponents_and_for_steps_are_left_alone():
    ids = {m.id for m in cm.mutants(SNIPPET, "x.cpp")}
    assert not any(i.startswith(("x.cpp:1:", "x.cpp:2:", "x.cpp:3:", "x.cpp:5:", "x.cpp:8:")) for i in ids)
    assert not any(":6:" in i and i.endswith(("-->+", "+->-")) for i in ids)  # the exponent's sign
    assert not any(i.startswith("x.cpp:7:") and (":<->" in i or ":>->" in i) for i in ids)  # max<float>
    assert not any(i.startswith("x.cpp:6:31:+=") for i in ids)  # k += 4: dropping it only hangs the loop


@pytest.mark.parametrize("file, source", _sources(), ids=[f for f, _ in _sources()])
def test_every_mutant_of_the_real_sources_differs_from_them_in_exactly_one_place(file, source):
    muts = cm.mutants(source, file)
    assert len(muts) > 20
    assert [m.id for m in muts] == [m.id for m in cm.mutants(source, file)]  # deterministic
    assert len({m.id for m in muts}) == len(muts)
    assert [m.offset for m in muts] == sorted(m.offset for m in muts)  # source order
    lines = source.splitlines()
    for m in muts:
        mutated = m.apply(source)
        assert mutated != source
        assert mutated[:m.offset] == source[:m.offset]
        assert mutated[m.offset + len(m.replacement):] == source[m.offset + len(m.original):]
        changed = [i for i, (a, b) in enumerate(zip(lines, mutated.splitlines())) if a != b]
        assert changed == [m.line - 1], m.id
        assert lines[m.line - 1][m.col - 1:].startswith(m.original), m.id


def test_apply_refuses_a_source_that_moved():
    m = cm.mutants("int a = b + c;\n", "x.cpp")[0]
    with pytest.raises(AssertionError, match="the source moved"):
        m.apply("int a = b - c;\n")


def test_the_kill_rate_counts_detected_over_built_non_equivalent_and_flags_stale_entries():
    entries = {
        "a": {"status": "killed", "mutated_line": "x"},
        "b": {"status": "timeout", "mutated_line": "x"},
        "c": {"status": "crashed", "mutated_line": "x"},
        "d": {"status": "survived", "mutated_line": "same"},
        "e": {"status": "survived", "mutated_line": "new"},
        "f": {"status": "build-failed", "mutated_line": "x"},
        "g": {"status": "survived", "mutated_line": "y"},
    }
    for ident, e in entries.items():
        e.update(id=ident, file="ops.cpp")
    eq = {"d": ("same", "why"), "e": ("old", "why"), "a": ("x", "why")}
    s = cm.score({"mutants": entries}, eq)
    assert (s["built"], s["build_failed"], s["detected"], s["equivalent"], s["undetected"]) == (6, 1, 3, 1, 2)
    assert s["kill_rate"] == pytest.approx(3 / 5)
    assert s["stale"] == ["e"] and s["unneeded"] == ["a"]
    md = cm.summary_markdown({"mutants": entries, "runs": []}, eq)
    assert "**60.0%**" in md and "equivalent: why" in md and "Stale ledger entries" in md


def test_an_equivalent_whose_mutated_line_holds_a_bitwise_or_parses_whole(tmp_path):
    """The ledger's fields are split on the first and the last " | ": a C++ line with `` | `` stays whole."""
    ledger = tmp_path / "eq.txt"
    ledger.write_text("# comment\n\na.cpp:1:2:<-><= | x = y | (s <= 0 ? 256 : 0); | the reason\n")
    assert cm.load_equivalents(ledger) == {"a.cpp:1:2:<-><=": ("x = y | (s <= 0 ? 256 : 0);", "the reason")}


def test_the_equivalents_ledger_parses_and_names_real_mutants():
    """Each entry names a mutant of the sources of the report's last run, and its mutated line."""
    eq = cm.load_equivalents()
    sources = cm.committed_sources(cm.last_run_commit())
    by_id = {m.id: (m, src) for f, src in sources.items() for m in cm.mutants(src, f)}
    for ident, (line, reason) in eq.items():
        assert reason, ident
        if ident in by_id:  # an entry of a source that changed since is reported stale by --check
            m, src = by_id[ident]
            assert m.mutated_line(src) == line, ident
