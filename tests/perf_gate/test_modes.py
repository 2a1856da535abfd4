"""The perf plugin's modes in a real git checkout (subprocesses): stored baselines, foreign CPUs and
A/B, the targets, the old side's settings, unreachable revisions and the accuracy gate."""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest

from perf import gate as G
from perf.ab_verdicts import (
    ABOutcome,
    ab_table,
    apply_fresh_confirmation,
)
from perf.gate import HIGHER, Rule
from perf.targets import speed_targets_asserted
from tests.perf_gate.support import (
    EXTRA_TEST,
    ROOT,
    _git,
    _save_foreign_baseline,
    saved_files,
)

# --------------------------------------------------------------------------------------------
# The plugin: modes, foreign CPUs, A/B in a real git checkout, accuracy
# --------------------------------------------------------------------------------------------


def test_plugin_stored_mode_is_reported(synth_git):
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "mode: stored baseline for" in out and "gate passed" in out


def test_plugin_foreign_cpu_baseline_never_gates_speed_ab_instead(synth_git):
    path = _save_foreign_baseline(synth_git)
    rev = json.loads(path.read_text())["commit_info"]["id"]
    # unchanged code: the stored 0.5 would fail it; A/B against the same revision passes
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert f"A/B against {rev[:12]} measured here" in out and "Intel(R) Xeon(R) Processor" in out
    assert "--perf-clock=cpu --perf-threads=1)" in out  # the old side measured as this run does
    assert "gate passed (A/B" in out and "REGRESSED" not in out
    # --perf-mode=stored refuses the foreign baseline
    rc, out = synth_git("--benchmark-compare", "--perf-mode=stored")
    assert rc == 4, out
    assert "never used here" in out and "Traceback" not in out
    # a slower new revision (+50%) fails, against the old revision measured here; a new benchmark is not gated
    (synth_git.repo / "ratio.txt").write_text("3.0")
    (synth_git.repo / "test_extra.py").write_text(EXTRA_TEST)
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "GATE FAILED (A/B" in out and "REGRESSED" in out and "test_layer" in out
    assert "confirmed in fresh processes" in out and "new/old per round 3/2, 3/2, 3/2" in out
    assert "test_brand_new" in out and "new in this revision" in out
    # within tolerance (+5%) passes, the new benchmark still not gated
    (synth_git.repo / "ratio.txt").write_text("2.1")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out


def test_ab_regression_seen_only_in_this_runs_process_is_refuted_in_fresh_processes(synth_git):
    """A figure that depends on the process (as the cached forward at 1024x1024 does on an AMD EPYC
    family 23 model 1): this run's process draws 3.0 where every fresh process of either revision
    measures 2.0. The A/B's rounds pair the one draw with the old side and regress it; the
    confirmation measures both revisions in fresh processes and refutes it. Without the
    confirmation the same draw fails the run."""
    path = _save_foreign_baseline(synth_git)
    rev = json.loads(path.read_text())["commit_info"]["id"]
    (synth_git.repo / "ratio_once.txt").write_text("3.0")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert (
        "test_synth.py::test_layer: regressed in the A/B; confirming in fresh processes of both revisions (3 rounds)"
        in out
    )
    assert "refuted by its confirmation in fresh processes" in out
    assert f"beyond, then REFUTED in A/B against {rev[:12]} measured here: new/old per round 3/2, 3/2" in out
    assert "new/old per round 2/2, 2/2, 2/2" in out and "GATE FAILED" not in out
    (synth_git.repo / "ratio_once.txt").write_text("3.0")
    rc, out = synth_git("--benchmark-compare", "--perf-ab-confirm=off")
    assert rc == 1, out
    assert "GATE FAILED (A/B" in out and "confirming in fresh processes" not in out


def test_apply_fresh_confirmation_refutes_only_what_its_rounds_pass():
    rule = Rule(HIGHER, 0.15)

    def outcome(test, figure, status="regressed"):
        return ABOutcome(test=test, figure=figure, rule=rule, new=[3.0, 3.0], old=[2.0, 2.0], status=status)

    passed, confirmed, unjudged, other, ok = (outcome("t::a", "x"), outcome("t::a", "y"), outcome("t::a", "z"),
                                              outcome("t::b", "x"), outcome("t::a", "w", "pass"))
    verdicts = [ABOutcome(test="t::a", figure="x", rule=rule, new=[2.0] * 3, old=[2.0] * 3, status="pass"),
                ABOutcome(test="t::a", figure="y", rule=rule, new=[3.0] * 3, old=[2.0] * 3, status="regressed"),
                ABOutcome(test="t::a", figure="w", rule=rule, new=[9.0] * 3, old=[2.0] * 3, status="regressed")]
    apply_fresh_confirmation([passed, confirmed, unjudged, other, ok], "t::a", verdicts, "a" * 40)
    assert passed.status == "refuted" and not passed.failed and "new/old per round 2/2, 2/2, 2/2" in passed.note
    assert confirmed.failed and confirmed.note.startswith("confirmed in fresh processes: t::a: y REGRESSED")
    assert unjudged.failed and unjudged.note == "confirmed in fresh processes: no verdict"
    assert other.failed and other.note == ""  # another benchmark: not this confirmation's to judge
    assert ok.status == "pass" and ok.note == ""  # a pass is never re-judged
    assert ab_table([passed])[1][-1] == "refuted"


def test_speed_targets_are_reported_by_default_and_asserted_only_when_asked():
    assert not speed_targets_asserted("report") and speed_targets_asserted("on")
    with pytest.raises(ValueError, match="--perf-targets must be one of report, on"):
        speed_targets_asserted("auto")


def test_no_per_cpu_exemption_file_is_left():
    assert not (ROOT / "perf" / "targets_missed.json").exists()
    assert not hasattr(G, "known_target_misses")


TARGET_TEST = textwrap.dedent(
    """
    from pathlib import Path

    def test_target(benchmark, perf_gate):
        benchmark.pedantic(lambda: None, rounds=3)
        kernel = Path("kernel.txt").read_text()
        perf_gate.speed_target(benchmark, kernel, "packed b32 (3072, 3072): ratio vs nn.Linear 0.901, target <= 1.1",
                               None)
        perf_gate.speed_target(benchmark, kernel,
                               "packed b1-cold (3072, 3072): ratio vs nn.Linear 4.074, target <= 0.35",
                               "packed b1-cold (3072, 3072): ratio vs nn.Linear 4.074, re-measured 4.105, "
                               "target <= 0.35")
    """
)


def test_a_missed_speed_target_is_reported_on_every_path_and_fails_only_under_perf_targets_on(synth):
    (synth.path / "test_synth.py").write_text(TARGET_TEST)
    for kernel in ("native-avx2", "native-avx512"):
        (synth.path / "kernel.txt").write_text(kernel)
        rc, out = synth()
        assert rc == 0, out
        assert f"({kernel}): 1 met, 1 missed (reported, not asserted; --perf-targets=on asserts them)" in out
        assert (
            "MISSED test_synth.py::test_target: packed b1-cold (3072, 3072): ratio vs nn.Linear 4.074, re-measured"
            in out
        )
        assert "MET    test_synth.py::test_target: packed b32 (3072, 3072): ratio vs nn.Linear 0.901" in out
        rc, out = synth("--perf-targets=on")
        assert rc == 1, out
        assert "target <= 0.35" in out and "1 met, 1 missed (asserted: those tests failed)" in out


def test_ab_old_side_gets_this_runs_settings_and_drops_those_it_does_not_define(synth_git):
    from perf import ab

    shutil.copytree(ROOT / "perf", synth_git.repo / "perf", ignore=shutil.ignore_patterns("__pycache__"))
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "perf in tree")
    rev = _git(synth_git.repo, "rev-parse", "HEAD")
    old = ab.OldSide(synth_git.repo, rev, ["test_synth.py"], None, None,
                     ["--perf-clock=wall", "--perf-threads=1", "--perf-no-such-option=3"])
    try:
        assert old.options == ["--perf-clock=wall", "--perf-threads=1"]
        assert old.dropped_options == ["--perf-no-such-option=3"]
        (entry,) = old.run(1).values()
        assert entry["ratio_vs_linear"] == 2.0
        info = json.loads((old.tmp / "round1.json").read_text())["machine_info"]
        assert info["qins_perf_clock"] == "wall" and info["qins_perf_threads"] == 1
    finally:
        old.cleanup()


def test_plugin_unreachable_revision_says_what_to_do(synth_git):
    path = _save_foreign_baseline(synth_git)
    data = json.loads(path.read_text())
    data["commit_info"]["id"] = "f" * 40
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare")
    assert rc == 4, out
    assert "cannot be checked out" in out and "git fetch" in out and G.SAVE_COMMAND in out
    assert "Traceback" not in out
    data["commit_info"] = {}
    path.write_text(json.dumps(data))
    rc, out = synth_git("--benchmark-compare")
    assert rc == 4, out
    assert "records no git revision" in out and "Traceback" not in out


def test_plugin_shallow_clone_says_fetch_depth(synth_git, tmp_path):
    path = _save_foreign_baseline(synth_git)
    _git(synth_git.repo, "add", "-A")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    (synth_git.repo / "ratio.txt").write_text("2.0\n")
    _git(synth_git.repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "later")
    clone = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{synth_git.repo}", str(clone)], check=True)
    rc, out = synth_git("--benchmark-compare", cwd=clone)
    assert rc == 4, out
    assert "shallow clone" in out and "--unshallow" in out and "--depth" in out and "Traceback" not in out
    assert path.name in out


def test_plugin_not_a_git_checkout(synth, tmp_path):
    rc, out = synth("--benchmark-save=baseline", first=1.0)
    assert rc == 0, out
    (path,) = saved_files(synth.path)
    data = json.loads(path.read_text())
    data["machine_info"]["cpu"]["brand_raw"] = "Some Other CPU"
    data["commit_info"] = {"id": "a" * 40}
    path.write_text(json.dumps(data))
    rc, out = synth("--benchmark-compare", first=1.0)
    assert rc == 4, out
    assert "not a git checkout" in out and "Some Other CPU" in out and "Traceback" not in out


def test_plugin_accuracy_gate(synth_git):
    rc, out = synth_git("--benchmark-save=baseline")
    assert rc == 0, out
    (synth_git.repo / "sqnr.txt").write_text("39.6")  # -0.4 dB: within 0.5 dB
    rc, out = synth_git("--benchmark-compare")
    assert rc == 0, out
    assert "accuracy layer_sqnr (sqnr_db) ok" in out
    (synth_git.repo / "sqnr.txt").write_text("39.3")  # -0.7 dB
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "accuracy layer_sqnr (sqnr_db) REGRESSED" in out and "ACCURACY GATE FAILED" in out and "Traceback" not in out
    rc, out = synth_git("--benchmark-compare", "--perf-sqnr-tol-db=1.0")
    assert rc == 0, out
    (synth_git.repo / "sqnr.txt").write_text("40.0")
    (synth_git.repo / "cos.txt").write_text("0.9997")  # -2e-4
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "accuracy out_cos (cosine) REGRESSED" in out


def test_plugin_accuracy_gated_against_a_foreign_cpu_baseline(synth_git):
    _save_foreign_baseline(synth_git)
    (synth_git.repo / "sqnr.txt").write_text("38.0")
    rc, out = synth_git("--benchmark-compare")
    assert rc == 1, out
    assert "A/B against" in out and "accuracy layer_sqnr (sqnr_db) REGRESSED" in out
