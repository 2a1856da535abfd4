"""The README's per-CPU results tables and docs/perf.png, generated from the committed baselines.

    python docs/results.py            # rewrite README.md's results block, docs/perf.png and its sidecar
    python docs/results.py --check    # exit 1 when either is not what the newest baselines give

Reads the newest committed baseline of each CPU folder,
``.benchmarks/<cpu key>/<machine id>/NNNN_baseline.json`` (pytest-benchmark's format: figures in
``benchmarks[*].extra_info``, the CPU in ``machine_info["cpu"]``), and writes between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md one table per CPU: the
memory-saving layer's time against ``nn.Linear`` fp32 per shape, format and batch case
(``perf/test_kernels.py``'s ``ratio_vs_linear``) and the end-to-end ratios against FP32
(``perf/test_e2e.py``: tokens/s, decoder linear bytes, peak memory while generating), and SmolLM2's
(``perf/test_e2e_real.py``: tokens/s and whole-model bytes, decoder Linears only and with the
embedding and tied ``lm_head`` in QINS too), and thread scaling (``perf/test_threads.py``: the packed
3072x8192 layer and Phi-3's generation at one thread and at every core, time over fp32's at the same
thread count, wall clock). A baseline
saved before those benchmarks existed shows what it has (the memory-saving layer of its revision).

The chart's source (the baseline files and a SHA-256 of the plotted figures) is recorded in the
sidecar ``docs/perf.png.json``; ``--check`` compares the sidecar, not the image bytes, so it does
not depend on the matplotlib version. Only the standard library is needed, except matplotlib to
draw the chart.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
ACC_BEGIN = "<!-- accuracy:begin -->"
ACC_END = "<!-- accuracy:end -->"
PPL_ORDER = ("fp32", "bf16", "int8-row", "qins-packed", "qins-packed-calibrated", "qins-split", "qins-split-calibrated",
             "qins-packed-emb")
README = "README.md"
CHART = "docs/perf.png"
SIDECAR = "docs/perf.png.json"
BASELINE_RE = re.compile(r"^\.benchmarks/([^/]+)/([^/]+)/(\d{4})_baseline\.json$")

SHAPES = ("3072x3072", "3072x8192")
BATCHES = ("b1-hot", "b1-cold", "b8", "b32", "b512")
FORMATS = ("packed", "split")
BATCH_LABEL = {"b1-hot": "batch 1 hot", "b1-cold": "batch 1 cold", "b8": "batch 8", "b32": "batch 32",
               "b512": "batch 512"}
E2E = (("tokens_per_s_vs_fp32", "tokens/s vs FP32"), ("linear_bytes_vs_fp32", "decoder linear bytes vs FP32"),
       ("peak_generate_vs_fp32", "peak memory while generating vs FP32"))
#: SmolLM2-135M end to end (perf/test_e2e_real.py): mode -> row label, then the figures shown
E2E_REAL_MODES = (("qins-packed-memsave", "decoder Linears"),
                  ("qins-packed-memsave-emb", "embeddings and lm_head too"))
E2E_REAL = (("tokens_per_s_vs_fp32", "tokens/s vs FP32"), ("model_bytes_vs_fp32", "whole-model bytes vs FP32"))
#: the memory-saving layer of baselines saved before the native kernels (perf/test_layer.py)
LEGACY = (("3072-b1-memsave-eager", "3072×3072 batch 1, decode per call, eager"),
          ("3072-b1-memsave-compiled", "3072×3072 batch 1, decode per call, compiled"),
          ("3072-32x128-memsave-eager", "3072×3072 32×128 tokens, decode per call, eager"))
#: thread scaling (perf/test_threads.py): case -> row label; each figure is the time over fp32's at the same
#: thread count, wall clock (the layer against nn.Linear, generation against the FP32 model)
THREADS = (("b1-1thread", "layer 3072×8192 packed, batch 1, 1 thread"),
           ("b1-allcores", "layer 3072×8192 packed, batch 1, every core"),
           ("b32-1thread", "layer 3072×8192 packed, batch 32, 1 thread"),
           ("b32-allcores", "layer 3072×8192 packed, batch 32, every core"),
           ("generate-1thread", "generation time (Phi-3, packed), 1 thread"),
           ("generate-allcores", "generation time (Phi-3, packed), every core"))
TICKS = (0.2, 0.3, 0.5, 1, 2, 3, 5)
ISA_NAMES = (("avx512vbmi", "AVX-512 VBMI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def committed_baselines(root: Path = ROOT) -> list[str]:
    """Paths (relative to ``root``) of the baseline files git tracks; every one on disk when
    ``root`` is not a git checkout (an unpacked archive, a test's temporary tree)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--", ".benchmarks"],
                             capture_output=True, text=True, check=True).stdout
        names = [n for n in out.split("\0") if n]
        inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                                capture_output=True, text=True, check=True).stdout.strip()
        if Path(inside).resolve() != root.resolve():
            raise subprocess.CalledProcessError(1, "git")  # root is a folder inside another checkout
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(root).as_posix() for p in (root / ".benchmarks").glob("*/*/*_baseline.json")]
    return sorted(n for n in names if BASELINE_RE.match(n) and (root / n).is_file())


def newest_per_cpu(paths: list[str]) -> dict[str, str]:
    """CPU folder -> its newest baseline (highest ``NNNN``; machine ids compared by name after it)."""
    newest: dict[str, tuple[int, str, str]] = {}
    for path in paths:
        cpu, machine, number = BASELINE_RE.match(path).groups()
        key = (int(number), machine, path)
        if cpu not in newest or key > newest[cpu]:
            newest[cpu] = key
    return {cpu: newest[cpu][2] for cpu in sorted(newest)}


def cpu_label(machine_info: dict) -> str:
    cpu = machine_info.get("cpu", {})
    brand = re.sub(r"\s+", " ", str(cpu.get("brand_raw", "unknown CPU"))).strip()
    flags = {str(f).replace("_", "") for f in cpu.get("flags", [])}
    isa = next((name for flag, name in ISA_NAMES if flag in flags), "no AVX2")
    return f"{brand}, family {cpu.get('family', '?')} model {cpu.get('model', '?')} ({isa})"


def _case(name: str) -> str:
    return name[name.index("[") + 1:name.rindex("]")] if "[" in name else ""


def summarize(path: str, data: dict) -> dict:
    """The figures the README and the chart show, from one baseline's JSON (floats rounded to 4
    significant digits, so the hash does not depend on printing)."""
    kernel: dict[str, dict[str, float]] = {}
    e2e: dict[str, dict[str, float]] = {}
    e2e_real: dict[str, dict[str, float]] = {}
    legacy: dict[str, float] = {}
    threads: dict[str, float] = {}
    ppl: dict[str, dict] = {}
    paths = set()
    for bench in data.get("benchmarks", []):
        name, info = bench.get("name", ""), bench.get("extra_info", {})
        case = _case(name)
        if name.startswith("test_memory_saving_layer[") and "ratio_vs_linear" in info:
            shape, fmt, batch = case.split("-", 2)
            kernel.setdefault(f"{shape}-{batch}", {})[fmt] = float(f"{info['ratio_vs_linear']:.4g}")
            if info.get("kernel"):
                paths.add(info["kernel"])
        elif name.startswith("test_memory_saving_layer_thread_scaling[") and "ratio_vs_linear" in info:
            threads[case] = float(f"{info['ratio_vs_linear']:.4g}")
        elif name.startswith("test_generation_thread_scaling[") and "ratio_vs_fp32" in info:
            threads[f"generate-{case}"] = float(f"{info['ratio_vs_fp32']:.4g}")
        elif name.startswith("test_generate_large_model[") and "tokens_per_s_vs_fp32" in info:
            fmt = "packed" if "packed" in case else "split"
            e2e[fmt] = {key: float(f"{info[key]:.4g}") for key, _ in E2E if key in info}
        elif name.startswith("test_generate_smollm2[") and "tokens_per_s_vs_fp32" in info:
            e2e_real[case] = {key: float(f"{info[key]:.4g}") for key, _ in E2E_REAL if key in info}
        elif name.startswith("test_perplexity_smollm2[") and "ppl" in info:
            ppl[case] = {
                "bytes": info["bytes_per_weight"],
                "tokens": info["tokens"],
                "ppl": float(f"{info['ppl']:.6g}"),
                "increase": round(float(info["ppl_increase_pct_value"]), 3),
                "minus_int8": [round(float(info["minus_int8_points"][k]), 3) for k in ("value", "low", "high")],
                "convert_cpu_s": round(float(info["convert_cpu_s"]), 1),
                "targets": [f"{t['status']}: {t['target']}" for t in info.get("accuracy_targets", [])],
            }
        elif name.startswith("test_qins_forward[") and case in dict(LEGACY) and "ratio_vs_linear" in info:
            legacy[case] = float(f"{info['ratio_vs_linear']:.4g}")
    commit = data.get("commit_info", {})
    return {
        "baseline": path,
        "cpu": cpu_label(data.get("machine_info", {})),
        "commit": str(commit.get("id", "?"))[:7],
        "date": str(data.get("datetime", "?"))[:10],
        "torch": str(data.get("machine_info", {}).get("torch", "?")),
        "kernel_paths": sorted(paths),
        "kernel": {k: kernel[k] for k in sorted(kernel)},
        "e2e": {k: e2e[k] for k in sorted(e2e)},
        "e2e_real": {k: e2e_real[k] for k in sorted(e2e_real)},
        "legacy": legacy,
        "threads": {k: threads[k] for k in sorted(threads)},
        "perplexity": {k: ppl[k] for k in PPL_ORDER if k in ppl},
    }


def results(root: Path = ROOT) -> list[dict]:
    """One summary per CPU folder, from its newest committed baseline, in folder order."""
    return [summarize(path, json.loads((root / path).read_text()))
            for path in newest_per_cpu(committed_baselines(root)).values()]


# ----------------------------------------------------------------------------------------------
# README block
# ----------------------------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _short(r: dict) -> str:
    """A column header: the CPU's vendor, family/model and ISA class."""
    label = r["cpu"]
    vendor = "AMD" if "AMD" in label else ("Intel" if "Intel" in label else label.split(",")[0])
    m = re.search(r"family (\S+) model (\S+) \(([^)]*)\)", label)
    return f"{vendor} {m.group(1)}/{m.group(2)} ({m.group(3)})" if m else label


def render_block(rs: list[dict]) -> str:
    """The text between the markers (starting and ending with a newline): one table, a column per
    CPU, then each column's CPU, kernel path and baseline."""
    lines = [
        "",
        "<!-- generated by `python docs/results.py` from the newest committed baseline per CPU; do not edit -->",
        "",
        "| memory-saving mode vs fp32 | " + " | ".join(_short(r) for r in rs) + " |",
        "|---|" + "---|" * len(rs),
    ]
    for shape in SHAPES:
        for fmt in FORMATS:
            for batch in BATCHES:
                cells = [_x(r["kernel"].get(f"{shape}-{batch}", {}).get(fmt)) for r in rs]
                if any(c != "–" for c in cells):
                    label = f"layer {shape.replace('x', '×')} {fmt}, {BATCH_LABEL[batch]}"
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for fmt in FORMATS:
        for key, label in E2E:
            cells = [_x(r["e2e"].get(fmt, {}).get(key)) for r in rs]
            if any(c != "–" for c in cells):
                lines.append(f"| end to end {fmt}: {label} | " + " | ".join(cells) + " |")
    for mode, what in E2E_REAL_MODES:
        for key, label in E2E_REAL:
            cells = [_x(r.get("e2e_real", {}).get(mode, {}).get(key)) for r in rs]
            if any(c != "–" for c in cells):
                lines.append(f"| SmolLM2-135M packed, {what}: {label} | " + " | ".join(cells) + " |")
    for case, label in THREADS:
        cells = [_x(r.get("threads", {}).get(case)) for r in rs]
        if any(c != "–" for c in cells):
            lines.append(f"| threads: {label} | " + " | ".join(cells) + " |")
    for case, label in LEGACY:
        cells = [_x(r["legacy"].get(case)) for r in rs]
        if any(c != "–" for c in cells):
            lines.append(f"| split layer {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in rs:
        paths = ", ".join(f"`{p}`" for p in r["kernel_paths"]) or "measured before the native kernels"
        lines.append(f"- **{_short(r)}**: {r['cpu']}; kernel {paths}; baseline `{r['baseline'].split('/', 1)[1]}` "
                     f"(commit {r['commit']}, {r['date']}, torch {r['torch']}).")
    return "\n".join(lines + [""])


def render_accuracy(rs: list[dict]) -> str:
    """The accuracy block: the perplexity table of the newest baseline that has one (accuracy does
    not depend on the CPU), with its absolute targets."""
    have = [r for r in rs if r.get("perplexity")]
    lines = [
        "",
        "<!-- generated by `python docs/results.py` from the newest committed baseline with perplexity figures; "
        "do not edit -->",
        "",
    ]
    if not have:
        return "\n".join(lines + ["No committed baseline has perplexity figures yet (`perf/test_perplexity.py`).", ""])
    r = max(have, key=lambda x: (x["date"], x["baseline"]))
    fp32 = r["perplexity"].get("fp32", {})
    emb = (" (qins-packed-emb: the token embedding and the tied lm_head too)"
           if "qins-packed-emb" in r["perplexity"] else "")
    lines += [
        f"SmolLM2-135M-Instruct on {fp32.get('tokens', '?')} tokens of real news text (gensim's Lee corpus), "
        f"every decoder Linear quantized{emb}; fp32 perplexity {fp32.get('ppl', '?')}. Baseline "
        f"`{r['baseline'].split('/', 1)[1]}` ({r['cpu']}, commit {r['commit']}, {r['date']}); method and "
        "what was tried: [docs/accuracy.md](docs/accuracy.md).",
        "",
        "| format | bytes/weight | perplexity increase over fp32 | minus int8-per-row's, points [95% CI] | convert CPU "
        "s |",
        "|---|---|---|---|---|",
    ]
    for fmt, f in r["perplexity"].items():
        if fmt == "fp32":
            continue
        m = f["minus_int8"]
        lines.append(f"| {fmt} | {f['bytes']} | {f['increase']:+.3f}% | {m[0]:+.3f} [{m[1]:+.3f}, {m[2]:+.3f}] | "
                     f"{f['convert_cpu_s']:.1f} |")
    targets = [t for f in r["perplexity"].values() for t in f["targets"]]
    if targets:
        lines += ["", "Targets (reported by the perf suite, `--perf-targets=on` asserts them):", ""]
        lines += [f"- {t}" for t in targets]
    return "\n".join(lines + [""])


def readme_block(text: str, begin: str = BEGIN, end_marker: str = END) -> str:
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{README} has no {begin} ... {end_marker} block")
    return text[start + len(begin):end]


def replace_block(text: str, block: str, begin: str = BEGIN, end_marker: str = END) -> str:
    readme_block(text, begin, end_marker)  # raises when the markers are missing
    start, end = text.find(begin), text.find(end_marker)
    return text[:start + len(begin)] + block + text[end:]


# ----------------------------------------------------------------------------------------------
# Chart
# ----------------------------------------------------------------------------------------------


def chart_data(rs: list[dict]) -> dict:
    """What the chart plots: the CPUs with kernel or end-to-end figures."""
    return {"cpus": [{"cpu": r["cpu"], "baseline": r["baseline"], "kernel": r["kernel"], "e2e": r["e2e"]}
                     for r in rs if r["kernel"] or r["e2e"]]}


def data_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sidecar(rs: list[dict]) -> dict:
    data = chart_data(rs)
    return {"generator": "docs/results.py", "baselines": [r["baseline"] for r in rs], "data_sha256": data_hash(data)}


def draw_chart(rs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = chart_data(rs)["cpus"]
    # the cases some baseline has (a case added to the suite shows once a baseline measures it)
    cases = [c for c in (f"{s}-{b}" for s in SHAPES for b in BATCHES) if any(c in cpu["kernel"] for cpu in cpus)]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(2, 2, figsize=(15, 9.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / max(len(cpus), 1)
    for row, fmt in enumerate(FORMATS):
        ax = axes[row][0]
        for i, cpu in enumerate(cpus):
            xs, ys = [], []
            for j, case in enumerate(cases):
                value = cpu["kernel"].get(case, {}).get(fmt)
                if value is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(value)
            bars = ax.bar(xs, ys, width, color=colors[i % 10], label=cpu["cpu"])
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6.5, padding=1)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.text(-0.45, 1.0, "nn.Linear fp32 = 1", va="bottom", ha="left", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(0.15, 8)
        ax.set_yticks(TICKS)
        ax.set_yticklabels([f"{t:g}" for t in TICKS])
        ax.minorticks_off()
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace("-", "\n", 1).replace("x", "×", 1) for c in cases], fontsize=8)
        ax.set_ylabel("time / nn.Linear fp32 (log; lower is faster)")
        ax.set_title(
            f"Memory-saving layer, {fmt} ({'1 byte' if fmt == 'packed' else '2 bytes'} per weight), one thread"
        )
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(cpus), 1), fontsize=9, frameon=False)
    for row, (key, label, better) in enumerate((("tokens_per_s_vs_fp32", "tokens/s vs FP32", "higher is faster"),
                                                 ("peak_generate_vs_fp32", "peak memory vs FP32", "lower is smaller"))):
        ax = axes[row][1]
        for i, cpu in enumerate(cpus):
            for k, fmt in enumerate(FORMATS):
                value = cpu["e2e"].get(fmt, {}).get(key)
                if value is None:
                    continue
                x = i + (k - 0.5) * 0.4
                bar = ax.bar([x], [value], 0.38, color=colors[i % 10], alpha=1.0 if fmt == "packed" else 0.55,
                             hatch=None if fmt == "packed" else "//")
                ax.bar_label(bar, labels=[f"{fmt[0]} {value:.2f}"], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(cpus)))
        ax.set_xticklabels([c["cpu"].split(",")[1].strip().replace(" model ", "\nmodel ").split(" (")[0]
                            for c in cpus], fontsize=7)
        ax.set_title(f"End to end, Phi-3 1024×8: {label}\n(p = packed, s = split; {better})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("QINS memory-saving mode vs FP32, newest committed baseline per CPU (python docs/results.py)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Check and main
# ----------------------------------------------------------------------------------------------


def check_readme(root: Path = ROOT, rs: list[dict] | None = None) -> list[str]:
    rs = results(root) if rs is None else rs
    try:
        current = readme_block((root / README).read_text())
    except (OSError, ValueError) as exc:
        return [str(exc)]
    problems = []
    if current != render_block(rs):
        newest = ", ".join(r["baseline"] for r in rs)
        problems.append(f"{README}'s results block is not what the newest committed baselines give ({newest}): "
                        "run `python docs/results.py` and commit README.md")
    try:
        accuracy = readme_block((root / README).read_text(), ACC_BEGIN, ACC_END)
    except (OSError, ValueError) as exc:
        return problems + [str(exc)]
    if accuracy != render_accuracy(rs):
        problems.append(f"{README}'s accuracy block is not what the newest committed baseline with perplexity figures "
                        "gives: run `python docs/results.py` and commit README.md")
    return problems


def check_chart(root: Path = ROOT, rs: list[dict] | None = None) -> list[str]:
    rs = results(root) if rs is None else rs
    if not (root / CHART).is_file():
        return [f"{CHART} is missing: run `python docs/results.py`"]
    try:
        recorded = json.loads((root / SIDECAR).read_text())
    except (OSError, ValueError) as exc:
        return [f"{SIDECAR} is missing or unreadable ({exc}): run `python docs/results.py`"]
    expected = sidecar(rs)
    problems = []
    if recorded.get("baselines") != expected["baselines"]:
        problems.append(f"{CHART} was drawn from {recorded.get('baselines')}, the newest committed baselines are "
                        f"{expected['baselines']}: run `python docs/results.py` and commit the chart")
    elif recorded.get("data_sha256") != expected["data_sha256"]:
        problems.append(f"{CHART}'s plotted figures differ from those of {expected['baselines']}: "
                        "run `python docs/results.py` and commit the chart")
    return problems


def check(root: Path = ROOT) -> list[str]:
    rs = results(root)
    return check_readme(root, rs) + check_chart(root, rs)


def write(root: Path = ROOT, *, chart: bool = True) -> None:
    rs = results(root)
    path = root / README
    text = replace_block(path.read_text(), render_block(rs))
    path.write_text(replace_block(text, render_accuracy(rs), ACC_BEGIN, ACC_END))
    if chart:
        draw_chart(rs, root / CHART)
        (root / SIDECAR).write_text(json.dumps(sidecar(rs), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README's block or the chart is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{README} results block and {CHART} match the newest committed baselines")
        return 1 if problems else 0
    write(args.root)
    print(f"wrote {README}'s results block, {CHART} and {SIDECAR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
