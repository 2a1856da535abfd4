"""The README's per-CPU results tables and docs/perf.png are generated from the newest committed
baseline of each CPU (``docs/results.py``), and are never older than it."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("qins_docs_results", ROOT / "docs" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def test_readme_results_block_is_generated_from_the_newest_committed_baselines() -> None:
    assert results.check_readme(ROOT) == []


def test_perf_chart_is_drawn_from_the_newest_committed_baselines() -> None:
    assert results.check_chart(ROOT) == []


def test_every_cpu_folder_has_a_table() -> None:
    block = results.readme_block((ROOT / "README.md").read_text())
    newest = results.newest_per_cpu(results.committed_baselines(ROOT))
    assert newest, "no committed baseline under .benchmarks/"
    for path in newest.values():
        assert path.split("/", 1)[1] in block


def _copy_tree(tmp_path: Path) -> Path:
    """README, chart, sidecar and the newest baseline of each CPU, in a tree outside git."""
    root = tmp_path / "tree"
    for path in list(results.newest_per_cpu(results.committed_baselines(ROOT)).values()) + [
            results.README, results.CHART, results.SIDECAR]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / path, root / path)
    return root


def _add_newer_baseline(root: Path, scale: float) -> str:
    """Save a copy of one CPU's newest baseline as the next NNNN, its kernel ratios scaled."""
    newest = results.newest_per_cpu(results.committed_baselines(root))
    path = next(p for p in newest.values() if results.summarize(p, json.loads((root / p).read_text()))["kernel"])
    data = json.loads((root / path).read_text())
    for bench in data["benchmarks"]:
        if "ratio_vs_linear" in bench["extra_info"]:
            bench["extra_info"]["ratio_vs_linear"] *= scale
    number = int(Path(path).name[:4]) + 1
    new = f"{Path(path).parent.as_posix()}/{number:04d}_baseline.json"
    (root / new).write_text(json.dumps(data))
    return new


def test_the_copied_tree_is_current(tmp_path: Path) -> None:
    assert results.check(_copy_tree(tmp_path)) == []


@pytest.mark.parametrize("scale", [1.0, 1.5], ids=["same-figures", "new-figures"])
def test_a_newer_baseline_makes_the_block_and_the_chart_stale(tmp_path: Path, scale: float) -> None:
    root = _copy_tree(tmp_path)
    new = _add_newer_baseline(root, scale)
    readme, chart = results.check_readme(root), results.check_chart(root)
    assert len(readme) == 1 and "results block" in readme[0]
    assert len(chart) == 1 and new in chart[0]


def test_a_changed_chart_source_is_stale(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    sidecar = json.loads((root / results.SIDECAR).read_text())
    sidecar["data_sha256"] = "0" * 64
    (root / results.SIDECAR).write_text(json.dumps(sidecar))
    assert results.check_readme(root) == []
    assert len(results.check_chart(root)) == 1
    (root / results.SIDECAR).unlink()
    assert len(results.check_chart(root)) == 1


def test_an_edited_block_is_stale(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    readme = root / results.README
    text = readme.read_text()
    row = "| layer 3072×3072 packed, batch 1 cold |"
    assert row in text
    readme.write_text(text.replace(row, row.replace("cold", "cold (edited)"), 1))
    assert len(results.check_readme(root)) == 1


def test_regenerating_after_a_newer_baseline_makes_both_current(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    root = _copy_tree(tmp_path)
    _add_newer_baseline(root, 1.5)
    assert results.main(["--root", str(root)]) == 0
    assert results.main(["--check", "--root", str(root)]) == 0
    assert (root / results.CHART).stat().st_size > 10_000


def _ppl_bench(fmt: str, increase: float) -> dict:
    return {"name": f"test_perplexity_smollm2[{fmt}]", "extra_info": {
        "bytes_per_weight": 1, "tokens": 50176, "ppl": 30.0 * (1 + increase / 100), "ppl_increase_pct_value": increase,
        "minus_int8_points": {"value": increase - 0.1, "low": increase - 0.3, "high": increase + 0.1},
        "convert_cpu_s": 12.5, "accuracy_targets": [{"status": "met", "target": f"{fmt} target"}]}}


def test_the_accuracy_block_follows_the_newest_baseline_with_perplexity_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    root = _copy_tree(tmp_path)
    new = _add_newer_baseline(root, 1.0)
    data = json.loads((root / new).read_text())
    data["datetime"] = "2999-01-01T00:00:00"
    data["benchmarks"] = [b for b in data["benchmarks"] if not b["name"].startswith("test_perplexity_smollm2[")]
    data["benchmarks"] += [_ppl_bench("fp32", 0.0), _ppl_bench("qins-packed-calibrated", 0.123)]
    (root / new).write_text(json.dumps(data))
    assert any("accuracy block" in p for p in results.check_readme(root))
    assert results.main(["--root", str(root)]) == 0 and results.check(root) == []
    block = results.readme_block((root / results.README).read_text(), results.ACC_BEGIN, results.ACC_END)
    assert "| qins-packed-calibrated | 1 | +0.123% | +0.023 [-0.177, +0.223] | 12.5 |" in block
    assert new.split("/", 1)[1] in block and "- met: qins-packed-calibrated target" in block


#: benchmark name in a baseline -> (its figure, the README row's label)
_THREAD_ROWS = {
    "test_memory_saving_layer_thread_scaling[b1-1thread]": ("ratio_vs_linear",
                                                            "layer 3072×8192 packed, batch 1, 1 thread"),
    "test_memory_saving_layer_thread_scaling[b1-allcores]": ("ratio_vs_linear",
                                                             "layer 3072×8192 packed, batch 1, every core"),
    "test_generation_thread_scaling[1thread]": ("ratio_vs_fp32", "generation time (Phi-3, packed), 1 thread"),
    "test_generation_thread_scaling[allcores]": ("ratio_vs_fp32", "generation time (Phi-3, packed), every core"),
}


def test_the_thread_rows_show_each_cpus_baseline_figures_in_its_column() -> None:
    """Read straight from each newest baseline's JSON: a CPU whose baseline has a thread-scaling
    figure shows it (two decimals) in its column; one without shows a dash."""
    lines = results.readme_block((ROOT / "README.md").read_text()).splitlines()
    paths = list(results.newest_per_cpu(results.committed_baselines(ROOT)).values())
    seen = 0
    for name, (figure, label) in _THREAD_ROWS.items():
        row = [line for line in lines if line.startswith(f"| threads: {label} |")]
        want = []
        for path in paths:
            info = next((b["extra_info"] for b in json.loads((ROOT / path).read_text())["benchmarks"]
                         if b["name"] == name), None)
            want.append("–" if info is None else f"{info[figure]:.2f}x")
        if set(want) == {"–"}:
            assert row == []
            continue
        assert len(row) == 1, label
        assert [c.strip() for c in row[0].strip().strip("|").split("|")[1:]] == want
        seen += 1
    assert seen, "no committed baseline has a thread-scaling figure"
