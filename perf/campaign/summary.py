"""Summarise campaign results: python perf/campaign/summary.py OUT_DIR [OUT_DIR ...]"""
import csv
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
for d in sys.argv[1:]:
    with open(f"{d}/results.tsv") as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            rows[r["scenario"]].append(r)
print("| scenario | runs | passed (exit 0) | failed (exit 1) | other exit | wall s min / median / max |")
print("|---|---|---|---|---|---|")
for sc, rs in rows.items():
    walls = [int(r["wall_s"]) for r in rs]
    ok = sum(r["exit"] == "0" for r in rs)
    bad = sum(r["exit"] == "1" for r in rs)
    print(
        f"| {sc} | {len(rs)} | {ok} | {bad} | {len(rs) - ok - bad} | {min(walls)} / {statistics.median(walls):.0f} / "
        f"{max(walls)} |"
    )
