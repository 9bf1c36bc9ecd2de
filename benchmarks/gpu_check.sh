#!/usr/bin/env bash
# fastattn GPU check: build, test, sanitize, benchmark and profile memory in one run on a GPU machine.
#
#   benchmarks/gpu_check.sh [--quick] [--only triton|cuda|cpu] [--bench-only] [--budget SECONDS]
#
# --budget (default 540, env GPU_CHECK_BUDGET): the whole run's wall-clock budget, sized for a device
# call capped at 10 minutes. Every stage's timeout is cut to what is left; the tests leave 150 s for
# the benchmarks, which get `--max-seconds` (what they do not reach is recorded as over_time, and
# the results are still written).
#
# Stages (each one's failure is logged and the script goes on; it exits 1 at the end if any failed):
#   env        nvidia-smi queries (read only) and `fastattn info`
#   build      the extension in place for Hopper: TORCH_CUDA_ARCH_LIST=9.0a python setup.py build_ext --inplace
#   tests      pytest -m gpu                                             (not with --bench-only)
#   sanitizer  compute-sanitizer memcheck on csrc/cuda/sanitize_case.py  (not with --bench-only; if both exist)
#   bench      fastattn bench --gpu (--quick: the quick preset); also measures the ceilings
#              (bf16 matmul TFLOP/s, device-to-device copy GB/s) in the same process
#   memory     fastattn memory (--quick: the quick preset)
#   results    $OUT/bench.json (bench + ceilings + memory profile) and a copy at
#              benchmarks/results/<YYYY-MM-DD>-<gpu>.json (+ -tflops.png, -memory.png) for a human to commit
#
# Writes at most 8 files under $OUT (default ./gpu_out): gpu_check.log, bench.json, bench.csv,
# bench_tflops.png, bench_density.png, memory.png, summary.txt; prints the summary table last.
# GPU_CHECK_SKIP_BUILD=1 keeps the extension already built; PYTHON picks the interpreter (default python3);
# RESULTS_DIR replaces benchmarks/results as the folder the results copy goes to.
# Never changes clocks, power limits, compute mode or MIG, and never resets the card.
set -uo pipefail

OUT=${OUT:-./gpu_out}
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where the script was started
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
QUICK=0
ONLY=""
BENCH_ONLY=0
BUDGET=${GPU_CHECK_BUDGET:-540}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --bench-only) BENCH_ONLY=1 ;;
    --budget)
      shift
      BUDGET=${1:-} ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    --only)
      shift
      case "${1:-}" in triton|cuda|cpu) ONLY=$1 ;; *) echo "gpu_check: --only takes triton, cuda or cpu, got '${1:-}'" >&2; exit 2 ;; esac ;;
    --only=*)
      ONLY=${1#--only=}
      case "$ONLY" in triton|cuda|cpu) ;; *) echo "gpu_check: --only takes triton, cuda or cpu, got '$ONLY'" >&2; exit 2 ;; esac ;;
    -h|--help) sed -n '2,24p' "$SCRIPT"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

export PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
STAGES=""
FAILED=0

# run_stage NAME TIMEOUT_S CMD...: runs CMD with its output in the log, records ok/FAILED/skipped.
left() { echo $((BUDGET - SECONDS)); }  # SECONDS counts from the script's start

run_stage() {
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt "$limit" ]; then limit=$(left); fi
  if [ "$limit" -lt 10 ]; then
    FAILED=1  # a stage the budget left out is a check that did not happen
    skip_stage "$name" "time budget of ${BUDGET}s spent"
    return
  fi
  local start=$SECONDS
  echo "=== [$name] $*" | tee -a "$LOG"
  if declare -F "$1" > /dev/null; then  # a shell function: run it in a child bash so timeout applies
    export -f "$1"
    set -- bash -c "$1"
  fi
  timeout --kill-after=30 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [ $rc -eq 0 ]; then
    STAGES="$STAGES,$name=ok(${took}s)"
    echo "=== [$name] ok in ${took}s" | tee -a "$LOG"
  else
    FAILED=1
    [ $rc -eq 124 ] && rc="timeout after ${limit}s"
    STAGES="$STAGES,$name=FAILED(rc=$rc)"
    echo "=== [$name] FAILED (rc=$rc) after ${took}s; last lines:" | tee -a "$LOG"
    tail -n 15 "$LOG" | sed 's/^/    /'
  fi
}

skip_stage() {
  STAGES="$STAGES,$1=skipped($2)"
  echo "=== [$1] skipped: $2" | tee -a "$LOG"
}

# ---------------------------------------------------------------- env
env_report() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,mig.mode.current \
    --format=csv || true
  command -v nvcc && nvcc --version | tail -n 2
  "$PYTHON" -m fastattn info
}
run_stage env 120 env_report

# ---------------------------------------------------------------- build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
if [ "$ONLY" = "cpu" ] || [ "$ONLY" = "triton" ]; then
  export FASTATTN_CUDA=${FASTATTN_CUDA:-0}
else
  export FASTATTN_CUDA=${FASTATTN_CUDA:-1}
fi
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
  skip_stage build "GPU_CHECK_SKIP_BUILD=1 (extension already built)"
else
  run_stage build 1500 "$PYTHON" setup.py build_ext --inplace
fi

# ---------------------------------------------------------------- tests
if [ $BENCH_ONLY -eq 1 ]; then
  skip_stage tests "--bench-only"
  skip_stage sanitizer "--bench-only"
else
  TEST_FILES=(tests)
  if [ -n "$ONLY" ]; then
    shopt -s nullglob
    TEST_FILES=(tests/test_"$ONLY"*.py)
    shopt -u nullglob
  fi
  if [ ${#TEST_FILES[@]} -eq 0 ]; then
    FAILED=1
    STAGES="$STAGES,tests=FAILED(no tests/test_$ONLY*.py)"
    echo "=== [tests] FAILED: no tests/test_$ONLY*.py" | tee -a "$LOG"
  elif [ "$ONLY" = "cpu" ]; then
    run_stage tests $(($(left) - 150)) "$PYTHON" -m pytest -q -ra --durations=15 "${TEST_FILES[@]}"
  else
    # pytest exits 5 when nothing is selected: that is a failure here too (no GPU test ran).
    run_stage tests $(($(left) - 150)) "$PYTHON" -m pytest -m gpu -q -ra --durations=15 "${TEST_FILES[@]}"
  fi

  SANITIZE_CASE=csrc/cuda/sanitize_case.py
  if [ "$ONLY" = "cpu" ] || [ "$ONLY" = "triton" ]; then
    skip_stage sanitizer "--only $ONLY"
  elif ! command -v compute-sanitizer > /dev/null; then
    skip_stage sanitizer "compute-sanitizer not found"
  elif [ ! -f "$SANITIZE_CASE" ]; then
    skip_stage sanitizer "no $SANITIZE_CASE"
  else
    # No caching allocator, so an out-of-bounds access cannot land in memory torch holds.
    run_stage sanitizer $(($(left) - 150)) env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" "$SANITIZE_CASE"
  fi
fi

# ---------------------------------------------------------------- bench + memory
BENCH_ARGS=(--no-progress --out "$WORK/bench")
MEMORY_ARGS=(--no-progress --out "$WORK/memory")
if [ $QUICK -eq 1 ]; then BENCH_ARGS+=(--quick); MEMORY_ARGS+=(--quick); else BENCH_ARGS+=(--gpu); MEMORY_ARGS+=(--full); fi
case "$ONLY" in
  triton|cuda) BENCH_ARGS+=(--providers "$ONLY"); MEMORY_ARGS+=(--providers "$ONLY,sdpa-flash") ;;
  cpu) BENCH_ARGS+=(--device cpu --providers cpu); MEMORY_ARGS+=(--device cpu --providers cpu) ;;
esac
# The benchmarks stop starting measurements at --max-seconds (the rest is recorded as over_time); the
# stage timeout leaves room for the measurement in flight and for writing the results.
BENCH_SECONDS=$(($(left) - 120))
[ "$BENCH_SECONDS" -lt 1 ] && BENCH_SECONDS=1
run_stage bench $((BENCH_SECONDS + 60)) "$PYTHON" -m fastattn bench "${BENCH_ARGS[@]}" --max-seconds "$BENCH_SECONDS"
MEMORY_SECONDS=$(($(left) - 50))
[ "$MEMORY_SECONDS" -lt 1 ] && MEMORY_SECONDS=1
run_stage memory $((MEMORY_SECONDS + 30)) "$PYTHON" -m fastattn memory "${MEMORY_ARGS[@]}" --max-seconds "$MEMORY_SECONDS"
run_stage results 120 "$PYTHON" benchmarks/gpu_summary.py assemble --work "$WORK" --out "$OUT" \
  --results-dir "${RESULTS_DIR:-benchmarks/results}"

# ---------------------------------------------------------------- summary (last)
"$PYTHON" benchmarks/gpu_summary.py summary --out "$OUT" --stages "${STAGES#,}" | tee -a "$LOG"
echo "files under $OUT:"; ls -1 "$OUT"
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: some stages FAILED -- see $LOG" >&2
  exit 1
fi
echo "gpu_check: every stage passed"
