#!/usr/bin/env bash
# Gate campaign: repeated `pytest perf --benchmark-compare` runs of one or more scenarios, from a
# clean clone of a branch with its committed baselines. One line per run in $OUT/results.tsv
# (failed_figures: the count on the gate's `GATE FAILED ...: N figure(s) regressed` line; 0 when it passed).
#
#   perf/campaign/run.sh OUT_DIR REPO BRANCH N SCENARIO [SCENARIO ...]
#
# Scenarios (cycled round-robin, N rounds):
#   unchanged | slow15 | slow12        stored baseline for this CPU (QINS_PERF_INJECT_SLOWDOWN=1.5 / 1.2)
#   ab-unchanged | ab-slow15 | ab-slow12   the same, with the committed baseline of this CPU made to look
#                                      foreign (its cpu brand string altered) -> A/B against its revision
#   load                               unchanged, with two CPU-bound background processes
#                                      (python -c 'while True: pass' x2, started and stopped by PID)
# PERF_ARGS (env): extra pytest arguments, e.g. a selection: PERF_ARGS='perf/test_layer.py -k cached'
#   (default: the whole suite, `perf`).
# Python: the active environment (torch pinned first, pip install -e '.[test]'); the clone is the cwd,
# so `import qins` and `perf` resolve to the clone.
set -uo pipefail
out=$1 repo=$2 branch=$3 n=$4; shift 4
mkdir -p "$out"
out=$(cd "$out" && pwd)
clone="$out/clone"
[ -d "$clone" ] || git clone -q --branch "$branch" "$repo" "$clone"
( cd "$clone" && git log --oneline -1 ) > "$out/revision.txt"
foreign() {  # alter the CPU brand string of this CPU's committed baseline(s) (working tree only)
  python - "$clone" <<'PY'
import json, sys, pathlib
import cpuinfo
sys.path.insert(0, sys.argv[1])
from perf import gate as G
root = pathlib.Path(sys.argv[1]) / ".benchmarks"
key = G.cpu_key(cpuinfo.get_cpu_info())
for p in root.glob(f"{key}/*/*.json"):
    d = json.loads(p.read_text())
    d["machine_info"]["cpu"]["brand_raw"] += " (simulated foreign CPU)"
    p.write_text(json.dumps(d, indent=4))
    print("altered", p)
PY
}
restore() { ( cd "$clone" && git checkout -q -- .benchmarks ); }
[ -f "$out/results.tsv" ] || printf "scenario\trun\texit\twall_s\tmode\tfailed_figures\tlog\n" > "$out/results.tsv"
for ((i = 1; i <= n; i++)); do
  for sc in "$@"; do
    log="$out/$sc-$i.log"
    k=2; while [ -e "$log" ]; do log="$out/$sc-$i-$k.log"; k=$((k + 1)); done  # same scenario twice in a round
    env_inject=""
    case $sc in *slow15) env_inject=1.5 ;; *slow12) env_inject=1.2 ;; esac
    restore
    case $sc in ab-*) foreign > /dev/null ;; esac
    pids=()
    if [ "$sc" = load ]; then
      python -c 'while True: pass' & pids+=($!)
      python -c 'while True: pass' & pids+=($!)
    fi
    start=$(date +%s)
    ( cd "$clone" && QINS_PERF_INJECT_SLOWDOWN=$env_inject python -m pytest ${PERF_ARGS:-perf} --benchmark-compare -p no:cacheprovider ) > "$log" 2>&1
    rc=$?
    wall=$(( $(date +%s) - start ))
    for pid in "${pids[@]}"; do kill "$pid"; wait "$pid" 2>/dev/null; done
    mode=$(grep -m1 '^mode: ' "$log" | cut -c7-60)
    nfail=$(grep -m1 -oE '^GATE FAILED[^:]*: [0-9]+' "$log" | grep -oE '[0-9]+$')  # the gate's own count
    nfail=${nfail:-0}
    printf "%s\t%d\t%d\t%d\t%s\t%d\t%s\n" "$sc" "$i" "$rc" "$wall" "$mode" "$nfail" "$log" >> "$out/results.tsv"
  done
done
restore
