"""Chart of a perf run vs the baseline (PNG).

From a test run:   pytest perf --benchmark-compare --perf-plot=docs/perf.png
From saved JSON:   python -m perf.plot RUN.json [--baseline BASE.json] -o docs/perf.png

RUN.json is any pytest-benchmark JSON (``--benchmark-json=PATH`` or a file saved under
``.benchmarks/``); without ``--baseline`` the latest saved run for this machine is used.

Panels: (1) the ratio figures per benchmark, this run vs baseline (log scale); (2) each gated
figure's change against its baseline, with its limit; (3) tokens/s vs generated length with and
without the KV cache, per model (solid: this run, dashed: baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

RATIO_KEYS = ("ratio_vs_linear", "ratio_same_kind", "ratio_vs_fp32", "cache_speedup")
GATE_KEY = "qins_gate"


def _short(fullname: str) -> str:
    name = fullname.split("::", 1)[-1]
    return name.replace("test_qins_forward", "fwd").replace("test_generate", "gen").replace("test_", "")


def _gate_limits(info: Mapping) -> dict:
    return info.get("qins_gate_limits", {}) if isinstance(info, Mapping) else {}


def make_chart(
    current: Mapping[str, Mapping],
    baseline: Mapping[str, Mapping] | None,
    out_path,
    *,
    baseline_label: str | None = None,
    title: str = "QINS perf: this run vs baseline",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = baseline or {}
    rows = []  # (label, figure, now, base)
    for fullname, info in current.items():
        for key in RATIO_KEYS:
            v = info.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                continue
            if key == "ratio_vs_linear" and fullname.split("::")[-1].startswith("test_linear_fp32"):
                continue  # the reference itself, 1 by definition
            if key == "ratio_vs_fp32" and info.get("model") == "fp32":
                continue
            b = baseline.get(fullname, {}).get(key)
            b = b if isinstance(b, (int, float)) and b > 0 else None
            rows.append((_short(fullname), key, float(v), b, key in info.get(GATE_KEY, [])))

    fig = plt.figure(figsize=(19, max(9, 0.32 * len(rows) + 2)))
    gs = fig.add_gridspec(2, 3, width_ratios=[1.0, 1.0, 0.8], height_ratios=[1, 1])
    ax_ratio = fig.add_subplot(gs[:, 0])
    ax_change = fig.add_subplot(gs[:, 1])
    ax_tok = fig.add_subplot(gs[0, 2])
    ax_mem = fig.add_subplot(gs[1, 2])

    # (1) ratios, log scale
    ys = list(range(len(rows)))[::-1]
    labels = [f"{r[0]}  [{r[1].replace('ratio_vs_', 'x ').replace('cache_speedup', 'nocache/cache')}]" for r in rows]
    ax_ratio.barh([y + 0.2 for y in ys], [r[3] or 0 for r in rows], height=0.4, color="#bbbbbb", label="baseline")
    ax_ratio.barh([y - 0.2 for y in ys], [r[2] for r in rows], height=0.4, color="#1f77b4", label="this run")
    ax_ratio.set_yticks(ys)
    ax_ratio.set_yticklabels(labels, fontsize=7)
    ax_ratio.set_xscale("log")
    ax_ratio.axvline(1.0, color="k", lw=0.6)
    ax_ratio.set_xlabel("ratio (time vs reference; no-cache/cache for the KV-cache speedup)")
    ax_ratio.set_title("ratios per benchmark")
    ax_ratio.legend(loc="lower right", fontsize=8)

    # (2) change vs baseline of every gated figure (ratios and memory), with its limit
    status_color = {"pass": "#2ca02c", "unconfirmed": "#ff7f0e", "regressed": "#d62728", "ungated": "#bbbbbb"}
    gated = []  # (label, change %, limit %, color)
    for fullname, info in current.items():
        limits = _gate_limits(info)
        for fig_name in info.get(GATE_KEY, []):
            v = info.get(fig_name)
            b = baseline.get(fullname, {}).get(fig_name)
            if not isinstance(v, (int, float)) or not isinstance(b, (int, float)) or b <= 0:
                continue
            lim = limits.get(fig_name, {})
            if lim.get("baseline") is None or abs(lim["baseline"] - b) > 1e-9 * abs(b):
                lim = {}  # the run was gated against another baseline than the one charted
            limit = lim.get("limit")
            gated.append(
                (
                    f"{_short(fullname)} [{fig_name}]",
                    (v / b - 1.0) * 100,
                    None if limit is None or lim.get("status") == "ungated" else (limit / b - 1.0) * 100,
                    status_color.get(lim.get("status"), "#7f7f7f"),
                )
            )
    ys2 = list(range(len(gated)))[::-1]
    ax_change.barh(ys2, [g[1] for g in gated], color=[g[3] for g in gated], height=0.6)
    for y, g in zip(ys2, gated):
        if g[2] is not None:
            ax_change.plot([g[2], g[2]], [y - 0.4, y + 0.4], color="k", lw=1.5)
    ax_change.set_yticks(ys2)
    ax_change.set_yticklabels([g[0] for g in gated], fontsize=7)
    ax_change.axvline(0, color="k", lw=0.6)
    ax_change.set_xlabel(
        "change vs baseline, %  (black tick: limit; green pass, orange exceeded once,\n"
        "red regressed, grey not gated; time ratios/bytes: + is worse, speedups: - is worse)",
        fontsize=8,
    )
    ax_change.set_title("gated figures: change vs baseline" if gated else "gated figures: no baseline to compare")

    # (3) tokens/s vs length
    series = {}
    for fullname, info in current.items():
        if "tokens_per_s" in info and "new_tokens" in info:
            k = (info.get("model"), bool(info.get("use_cache")))
            b = baseline.get(fullname, {}).get("tokens_per_s")
            series.setdefault(k, []).append((info["new_tokens"], info["tokens_per_s"], b))
    palette = {"fp32": "#1f77b4", "qins-cached": "#ff7f0e", "qins-memsave": "#2ca02c"}
    for (model, cache), pts in sorted(series.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        pts.sort()
        color = palette.get(model, None)
        marker = "o" if cache else "s"
        label = f"{model} {'cache' if cache else 'no cache'}"
        ax_tok.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ls="-" if cache else ":", label=label
        )
        if all(p[2] for p in pts):
            ax_tok.plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, color=color, ls="--", alpha=0.35, lw=1)
    ax_tok.set_xlabel("new tokens (greedy)")
    ax_tok.set_ylabel("tokens/s")
    ax_tok.set_xscale("log", base=2)
    ax_tok.set_title("tokens/s vs length (faint: baseline)", fontsize=10)
    ax_tok.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    # (4) memory
    mem = [
        (info.get("key", fullname).split("/")[-1], info) for fullname, info in current.items() if "model_bytes" in info
    ]
    if mem:
        names = [m[0] for m in mem]
        x = list(range(len(mem)))
        mib = 1024 * 1024
        model_now = [m[1]["model_bytes"] / mib for m in mem]
        peak_now = [m[1]["peak_generate_delta"] / mib for m in mem]
        ax_mem.bar([i - 0.2 for i in x], model_now, width=0.4, label="model_memory (MiB)", color="#9467bd")
        ax_mem.bar(
            [i + 0.2 for i in x], peak_now, width=0.4, label="peak RSS above start, generating (MiB)", color="#8c564b"
        )
        for i, fullname in enumerate(f for f, i2 in current.items() if "model_bytes" in i2):
            b = baseline.get(fullname, {})
            if "model_bytes" in b:
                ax_mem.plot([i - 0.4, i], [b["model_bytes"] / mib] * 2, color="k", lw=2)
            if "peak_generate_delta" in b:
                ax_mem.plot([i, i + 0.4], [b["peak_generate_delta"] / mib] * 2, color="k", lw=2)
        ax_mem.set_xticks(x)
        ax_mem.set_xticklabels(names, fontsize=8)
        ax_mem.set_ylabel("MiB")
        ax_mem.set_title("memory (black ticks: baseline)")
        ax_mem.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax_mem.set_axis_off()

    fig.suptitle(title + (f"  [baseline: {baseline_label}]" if baseline_label else "  [no baseline]"), fontsize=11)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _entries(path: Path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf8"))
    return {b["fullname"]: b.get("extra_info", {}) for b in data["benchmarks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="pytest-benchmark JSON of the run to chart")
    ap.add_argument(
        "--baseline", type=Path, default=None, help="baseline JSON (default: latest saved run for this machine)"
    )
    ap.add_argument("--storage", type=Path, default=Path(".benchmarks"))
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/perf.png"))
    args = ap.parse_args(argv)
    base_path = args.baseline
    if base_path is None:
        from pytest_benchmark.utils import get_machine_id

        from perf.baseline import BaselineError, locate_baseline

        try:
            base_path = locate_baseline(args.storage, get_machine_id(), True)
        except BaselineError as exc:
            print(f"(no baseline: {str(exc).splitlines()[0]})", file=sys.stderr)
            base_path = None
    base = _entries(base_path) if base_path else None
    out = make_chart(_entries(args.run), base, args.output, baseline_label=str(base_path) if base_path else None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
