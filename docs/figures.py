"""Print the README's figure tables from a saved perf run (a pytest-benchmark JSON).

    python docs/figures.py .benchmarks/<cpu key>/<machine id>/NNNN_baseline.json

Reads only what the run stored in ``extra_info``; prints Markdown.
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", "?")
    print(f"<!-- from {path}: {cpu}, commit {data['commit_info'].get('id', '?')[:7]}, {data['datetime'][:10]} -->\n")
    by = {b["fullname"]: b["extra_info"] for b in data["benchmarks"]}

    print("| accuracy | QINS | int8 per channel (same test) |\n|---|---|---|")
    for name, info in by.items():
        if "accuracy" in info:
            q = ", ".join(f"{k} {v['value']:.6g}" for k, v in info["accuracy"].items())
            ref = info.get("reference_int8", {})
            r = (
                ", ".join(f"{k} {v['value'] if isinstance(v, dict) else v:.6g}" for k, v in ref.items())
                if isinstance(ref, dict)
                else str(ref)
            )
            print(f"| `{name.split('::')[-1]}` | {q} | {r} |")
    print()
    print("| kernel case | ratio vs nn.Linear | weight GB/s | floor GB/s | of floor |\n|---|---|---|---|---|")
    for name, info in by.items():
        if "test_kernels.py" in name and "ratio_vs_linear" in info:
            g = info.get("weight_gbps")
            extra = f"{g:.1f} | {info['floor_gbps']:.1f} | {info['floor_fraction']:.0%}" if g else "| |"
            print(f"| `{name.split('[')[-1].rstrip(']')}` | {info['ratio_vs_linear']:.3f} | {extra} |")
    print()
    for name, info in by.items():
        if "test_e2e.py" in name:
            print(
                f"- `{name.split('[')[-1].rstrip(']')}`: tokens/s {info['tokens_per_s']:.1f} vs FP32 "
                f"{info['fp32_tokens_per_s']:.1f} "
                f"({info['tokens_per_s_vs_fp32']:.2f}x); decoder linear bytes {info['linear_bytes_vs_fp32']:.3f}x; "
                f"peak RSS while generating {info['peak_generate_vs_fp32']:.3f}x "
                f"({info['peak_generate_delta'] / 2**20:.0f} vs {info['fp32_peak_generate_delta'] / 2**20:.0f} MiB)"
            )
        if "encode_speed" in name or "mse_encode" in name:
            print(
                f"- `{name.split('::')[-1]}`: "
                + ", ".join(f"{k} {v:.3g}" for k, v in info.items() if isinstance(v, float))
            )


if __name__ == "__main__":
    main(sys.argv[1])
