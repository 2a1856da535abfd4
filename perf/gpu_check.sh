#!/usr/bin/env bash
# The GPU check of the Triton backend, as one script for a lent GPU machine (CI has no GPU):
#   bash perf/gpu_check.sh            # from the repository root; logs and JSON go to $OUT
# Uses the machine's own python3 (torch, triton, hypothesis, pytest, pytest-xdist preinstalled);
# qins runs from the checkout (PYTHONPATH), nothing is installed. Steps, each with its own limit:
#   1. the machine: GPU, driver, versions
#   2. tests/test_triton_cuda.py: the table test alone, then the rest: compiled Triton kernels against
#      the CPU oracle (QINS_REQUIRE_CUDA=1: no silent skip)
#   3. perf/cuda_bench.py: cold-weight timings of every launch config against F.linear fp32/bf16
#   4. the rest of the suite's CUDA parametrisations (pytest tests -k cuda)
set -u
OUT=${OUT:-/tmp/qins-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CI=true HYPOTHESIS_PROFILE=ci HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export QINS_REQUIRE_CUDA=1 TORCH_EXTENSIONS_DIR=/tmp/qins-torch-extensions
unset TRITON_INTERPRET QINS_KERNEL
PY=${PY:-python3}
status=0
step() {  # step NAME LIMIT_S CMD...: run, log to $OUT/NAME.txt, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.txt"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}
step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; lscpu | grep 'Model name'; \
  $PY -c 'import torch, triton, hypothesis, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"hypothesis\", hypothesis.__version__, \"transformers\", transformers.__version__)'"
# -v: each result is logged as it ends, so a step cut off by its limit still names its failures
step table_cuda 90 $PY -m pytest tests/test_triton_cuda.py -v -p no:cacheprovider -k table
step test_triton_cuda "${QINS_GPU_TEST_LIMIT:-240}" $PY -m pytest tests/test_triton_cuda.py -v -p no:cacheprovider -n 8 -k "not table" --durations=5
step cuda_bench "${QINS_GPU_BENCH_LIMIT:-180}" $PY perf/cuda_bench.py --json "$OUT/cuda_bench.json"
step tests_cuda "${QINS_GPU_SUITE_LIMIT:-120}" $PY -m pytest tests -v -p no:cacheprovider -n 8 -k "cuda and not test_triton_cuda"
exit $status
