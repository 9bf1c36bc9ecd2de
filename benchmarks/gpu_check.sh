#!/usr/bin/env bash
# fastattn GPU check: the most important questions first, each stage's answer in $OUT as soon as it has one.
#
#   benchmarks/gpu_check.sh [--focus AREA] [--budget SECONDS] [--quick] [--dry-run]
#
# A full run (no --focus), in this order:
#   extension     prebuilt/<tag>/_C*.so copied into fastattn/ when this Python/torch/ABI and the C++/CUDA
#                 sources match it (benchmarks/prebuilt.py install); else the build starts in the background
#   env           nvidia-smi queries (read only) and `fastattn info`
#   smoke-triton  Triton forward+backward against the reference, a handful of configurations covering the
#                 main code paths, pinned configs (benchmarks/gpu_smoke.py correctness)       -> smoke.json
#   build         waits for the background build, if one started                               -> build.log
#   smoke-cuda    the same cases on the CUDA backend (a case it cannot serve is skipped, with why)
#   sanitizer     compute-sanitizer memcheck on csrc/cuda/sanitize_case.py
#   speed         D=128 bf16, L 4k/16k, causal or not, fwd and fwd+bwd: triton, cuda, SDPA flash, cuDNN,
#                 and the card's ceilings in the same process (gpu_smoke.py speed)           -> speed.json
#   tests         pytest -m gpu (what is left of the budget, less 150 s)
#   bench, memory fastattn bench --gpu / memory --full (--quick: their quick presets), as far as the budget goes
#   results       bench.json (+ memory profile), bench_tflops.png, memory.png; a copy in benchmarks/results/
# summary.txt is rewritten after every stage, so a run cut off anywhere still says what it learned.
#
# --focus AREA: a short follow-up call that re-checks one area (the extension and env stages always run):
#   triton    smoke-triton, speed (triton vs SDPA), pytest -m gpu tests/test_triton*.py
#   cuda      smoke-cuda, sanitizer, speed (cuda vs SDPA), pytest -m gpu tests/test_cuda*.py
#   decode    the decode cases (one query, long cache) on triton and cuda, and decode speed
#   sanitize  memcheck on sanitize_case.py, then memcheck and racecheck on the smoke cases at tiny shapes
#   speed     the headline and decode speed grids and the ceilings
#   bench     the wider benchmark and the memory profile with the whole budget
# --budget (default 540, env GPU_CHECK_BUDGET): wall-clock seconds for the whole run, sized for a device call
#   capped at 10 minutes. Each stage has its own cap, cut to what is left; one left under 10 s is skipped
#   (and counts as failed). --dry-run prints every stage, its command and its budget, and runs nothing.
#
# $OUT (default ./gpu_out) gets at most 8 files: gpu_check.log, summary.txt, smoke.json, speed.json,
# build.log (only when it built), bench.json, bench_tflops.png, memory.png. Exits 1 if a stage failed.
# FASTATTN_AUTOTUNE defaults to 0 (pinned configs). A build targets TORCH_CUDA_ARCH_LIST, by default the card's
# compute capability (9.0a on Hopper). GPU_CHECK_SKIP_BUILD=1 neither installs nor builds the
# extension; PYTHON picks the interpreter (default python3); RESULTS_DIR replaces benchmarks/results.
# Never changes clocks, power limits, compute mode or MIG, and never resets the card.
set -uo pipefail

OUT=${OUT:-./gpu_out}
case "$OUT" in /*) ;; *) OUT="$PWD/${OUT#./}" ;; esac  # relative to where the script was started
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
QUICK=0
FOCUS=""
DRY=0
BUDGET=${GPU_CHECK_BUDGET:-540}
FOCUS_AREAS="triton cuda decode sanitize speed bench"
set_focus() {
  case " $FOCUS_AREAS " in
    *" ${1:-} "*) FOCUS=$1 ;;
    *) echo "gpu_check: --focus takes one of: $FOCUS_AREAS; got '${1:-}'" >&2; exit 2 ;;
  esac
}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --budget) shift; BUDGET=${1:-} ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    --focus) shift; set_focus "${1:-}" ;;
    --focus=*) set_focus "${1#--focus=}" ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$SCRIPT"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

export PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # fastattn from this tree (scripts run from subfolders too)
export PYTHONUNBUFFERED=1
export FASTATTN_AUTOTUNE=${FASTATTN_AUTOTUNE:-0}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # build for the card at hand (Hopper: 9.0a); 9.0a without one
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  case "$TORCH_CUDA_ARCH_LIST" in 9.0|"") TORCH_CUDA_ARCH_LIST=9.0a ;; esac
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-16}
export FASTATTN_CUDA=${FASTATTN_CUDA:-1}
if [ $DRY -eq 0 ]; then
  mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
  LOG="$OUT/gpu_check.log"
  : > "$LOG"
  # A fresh start: a file left by an earlier run would read as this run's answer.
  rm -f "$OUT"/{smoke.json,speed.json,summary.txt,build.log,bench.json,bench_tflops.png,memory.png}
else
  LOG=/dev/null
  echo "gpu_check --dry-run: budget ${BUDGET}s, focus '${FOCUS:-none (full run)}', OUT=$OUT"
  echo "each line: when it starts if every earlier stage used its whole cap, the stage, its cap, its command"
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGES=""
FAILED=0
REST=""  # set while a stage's cap is what the others leave (shown so by --dry-run)
LAST_RC=0  # the exit status of the last stage run_stage ran
CLOCK=0  # --dry-run's clock: each planned stage advances it by its cap (the worst case)

now() { if [ $DRY -eq 1 ]; then echo $CLOCK; else echo $SECONDS; fi; }
left() { echo $((BUDGET - $(now))); }

# summarize [RUNNING]: rewrites $OUT/summary.txt from the stages so far and the results files.
summarize() {
  [ $DRY -eq 1 ] && return
  "$PYTHON" benchmarks/gpu_summary.py summary --out "$OUT" --planned "$PLAN" --stages "${STAGES#,}" \
    ${1:+--running "$1"} > /dev/null 2>> "$LOG"
}

record() {  # record NAME STATUS: one stage's outcome, in the log and the summary
  local status=${2//,/;}  # STAGES is comma-separated
  STAGES="$STAGES,$1=$status"
  echo "=== [$1] $status" | tee -a "$LOG"
  summarize
}

skip_stage() { record "$1" "skipped($2)"; }

# run_stage NAME CAP CMD...: runs CMD (a command or a shell function) for at most min(CAP, what is left)
# seconds with its output in the log, and records ok / FAILED / skipped.
run_stage() {
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt "$limit" ]; then limit=$(left); fi
  LAST_RC=1
  if [ $DRY -eq 1 ] && [ -n "$REST" ]; then  # a stage that gets what the others leave
    printf '  +%4ss  %-13s <= %s (worst case: %ss)  %s\n' "$(now)" "$name" "$REST" "$((limit < 10 ? 0 : limit))" "$(describe "$@")"
    [ "$limit" -ge 10 ] && CLOCK=$((CLOCK + limit))
    return
  fi
  if [ "$limit" -lt 10 ]; then
    FAILED=1  # a stage the budget left out is a check that did not happen
    if [ $DRY -eq 1 ]; then
      printf '  +%4ss  %-13s skipped: budget spent\n' "$(now)" "$name"
      return
    fi
    skip_stage "$name" "time budget of ${BUDGET}s spent"
    return
  fi
  if [ $DRY -eq 1 ]; then
    printf '  +%4ss  %-13s <=%4ss  %s\n' "$(now)" "$name" "$limit" "$(describe "$@")"
    CLOCK=$((CLOCK + limit))
    return
  fi
  local start=$SECONDS
  echo "=== [$name] (at most ${limit}s) $(describe "$@")" | tee -a "$LOG"
  summarize "$name"
  if declare -F "$1" > /dev/null; then  # a shell function: run it in a child bash so timeout applies
    export -f "$1"
    set -- bash -c "$1"
  fi
  timeout --kill-after=20 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  LAST_RC=$rc
  if [ $rc -eq 0 ]; then
    record "$name" "ok(${took}s)"
  else
    FAILED=1
    [ $rc -eq 124 ] && rc="timeout after ${limit}s"
    echo "=== [$name] last lines:" >> "$LOG"
    tail -n 15 "$LOG" | sed 's/^/    /'
    record "$name" "FAILED(rc=$rc, ${took}s)"
  fi
}

# describe CMD...: the command as the plan shows it; a shell function shows its body's commands.
describe() {
  if declare -F "$1" > /dev/null; then
    local body
    body=$(declare -f "$1" | sed '1,2d;$d' | sed 's/^ *//' | paste -sd ' ')
    body=${body//\"\$PYTHON\"/$PYTHON}
    echo "${body:0:400}"
  else
    echo "$*"
  fi
}

# ---------------------------------------------------------------- the plan
SMOKE=(benchmarks/gpu_smoke.py)
SANITIZE_CASE=csrc/cuda/sanitize_case.py
PLAN="extension env"
case "$FOCUS" in
  "") PLAN="$PLAN smoke-triton build smoke-cuda sanitizer speed tests bench memory results" ;;
  triton) PLAN="$PLAN smoke-triton speed tests" ;;
  cuda) PLAN="$PLAN build smoke-cuda sanitizer speed tests" ;;
  decode) PLAN="$PLAN build smoke-decode speed-decode" ;;
  sanitize) PLAN="$PLAN build sanitizer memcheck-tiny racecheck-tiny" ;;
  speed) PLAN="$PLAN build speed" ;;
  bench) PLAN="$PLAN build bench memory results" ;;
esac

# ---------------------------------------------------------------- extension (before anything imports fastattn)
BUILD_PID=""
EXT_STATUS=given  # given (GPU_CHECK_SKIP_BUILD=1), prebuilt, building or none
HAVE_EXT=1
BUILD_CAP=420
build_ext() { "$PYTHON" setup.py build_ext --inplace; }
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
  [ $DRY -eq 1 ] && echo "  extension: GPU_CHECK_SKIP_BUILD=1, the extension already in fastattn/ is used"
  [ $DRY -eq 0 ] && skip_stage extension "GPU_CHECK_SKIP_BUILD=1 (extension already built)"
elif [ $DRY -eq 1 ]; then
  printf '  +%4ss  %-13s <=%4ss  %s\n' 0 extension 60 "$PYTHON benchmarks/prebuilt.py install  (else the build below)"
  CLOCK=$((CLOCK + 60))
  if [ "$FOCUS" = "" ]; then
    printf '  %-20s <=%4ss  %s\n' "  (background) build" $BUILD_CAP \
      "FASTATTN_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST $PYTHON setup.py build_ext --inplace > build.log, only without a usable prebuilt"
  fi
else
  echo "=== [extension] $PYTHON benchmarks/prebuilt.py install" | tee -a "$LOG"
  if timeout 60 "$PYTHON" benchmarks/prebuilt.py install 2>&1 | tee -a "$LOG"; then
    EXT_STATUS=prebuilt
    record extension "prebuilt"
  elif [ "$FOCUS" = "triton" ]; then
    HAVE_EXT=0
    EXT_STATUS=absent
    record extension "none(no usable prebuilt; --focus triton does not build)"
  elif [ "$FOCUS" = "" ]; then
    # Build while the Triton smoke runs: it needs no extension, and the build would otherwise eat its minutes.
    limit=$BUILD_CAP
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    ( timeout --kill-after=20 "$limit" "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
      echo $? > "$WORK/build.rc" ) &
    BUILD_PID=$!
    BUILD_START=$SECONDS
    EXT_STATUS=building
    record extension "building(in the background, at most ${limit}s; see build.log)"
  else
    EXT_STATUS=none
    record extension "none(no usable prebuilt; the build stage builds it)"
  fi
fi

# ---------------------------------------------------------------- env
env_report() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,mig.mode.current --format=csv || true
  command -v nvcc && nvcc --version | tail -n 2
  "$PYTHON" -m fastattn info
}
run_stage env 45 env_report

smoke() {  # smoke STAGE CAP BACKENDS CASES: correctness of BACKENDS on CASES into smoke.json
  run_stage "$1" "$2" "$PYTHON" "${SMOKE[@]}" correctness --backends "$3" --cases "$4" --out "$OUT/smoke.json"
}

# build: the background build's end, or a foreground build for the focus areas that need the CUDA backend.
build_stage() {
  if [ -n "$BUILD_PID" ]; then
    local rc
    summarize build
    wait "$BUILD_PID"
    rc=$(cat "$WORK/build.rc" 2>/dev/null || echo "?")
    tail -n 20 "$OUT/build.log" >> "$LOG"
    if [ "$rc" = 0 ]; then
      record build "ok($((SECONDS - BUILD_START))s, in the background)"
    else
      FAILED=1
      HAVE_EXT=0
      [ "$rc" = 124 ] && rc="timeout"
      record build "FAILED(rc=$rc; see build.log)"
    fi
  elif [ $DRY -eq 0 ] && [ "$EXT_STATUS" = none ]; then
    run_stage build $BUILD_CAP build_ext
    [ $LAST_RC -eq 0 ] || HAVE_EXT=0
  elif [ $DRY -eq 0 ]; then
    record build "not needed(extension: $EXT_STATUS)"
  elif [ $DRY -eq 1 ] && [ "$FOCUS" != "" ] && [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    printf '  %-20s <=%4ss  %s\n' "  (if needed) build" $BUILD_CAP "$PYTHON setup.py build_ext --inplace  (only without a usable prebuilt; it counts against the budget)"
  fi
}

sanitizer() {  # sanitizer STAGE CAP TOOL CMD...: compute-sanitizer TOOL on CMD
  local name=$1 cap=$2 tool=$3
  shift 3
  if [ $HAVE_EXT -eq 0 ]; then
    skip_stage "$name" "no CUDA extension"
  elif [ $DRY -eq 0 ] && ! command -v compute-sanitizer > /dev/null; then
    skip_stage "$name" "compute-sanitizer not found"
  else
    # No caching allocator, so an out-of-bounds access cannot land in memory torch holds.
    run_stage "$name" "$cap" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" "$@"
  fi
}

speed() {  # speed STAGE CAP SET PROVIDERS
  run_stage "$1" "$2" "$PYTHON" "${SMOKE[@]}" speed --set "$3" --providers "$4" --out "$OUT/speed.json"
}

gpu_tests() {  # gpu_tests FILES...: pytest -m gpu with what is left, less RESERVE seconds
  # pytest exits 5 when nothing is selected: that is a failure here too (no GPU test ran).
  REST="the rest"; [ "$RESERVE" -gt 0 ] && REST="the rest - ${RESERVE}s"
  run_stage tests $(($(left) - RESERVE)) "$PYTHON" -m pytest -m gpu -q -ra --durations=15 "$@"
  REST=""
}

bench_and_memory() {
  local bench_args=(--no-progress --out "$WORK/bench") memory_args=(--no-progress --out "$WORK/memory")
  if [ $QUICK -eq 1 ]; then bench_args+=(--quick); memory_args+=(--quick); else bench_args+=(--gpu); memory_args+=(--full); fi
  # The benchmarks stop starting measurements at --max-seconds (the rest is recorded as over_time); the
  # stage timeout leaves room for the measurement in flight and for writing the results.
  local seconds=$(($(left) - 120))
  [ "$seconds" -lt 1 ] && seconds=1
  REST="the rest - 60s"
  run_stage bench $((seconds + 60)) "$PYTHON" -m fastattn bench "${bench_args[@]}" --max-seconds "$seconds"
  seconds=$(($(left) - 50))
  [ "$seconds" -lt 1 ] && seconds=1
  REST="the rest - 20s"
  run_stage memory $((seconds + 30)) "$PYTHON" -m fastattn memory "${memory_args[@]}" --max-seconds "$seconds"
  REST=""
  run_stage results 60 "$PYTHON" benchmarks/gpu_summary.py assemble --work "$WORK" --out "$OUT" \
    --results-dir "${RESULTS_DIR:-benchmarks/results}"
}

# ---------------------------------------------------------------- the stages
RESERVE=0
case "$FOCUS" in
  "")
    smoke smoke-triton 90 triton all
    build_stage
    smoke smoke-cuda 45 cuda all
    sanitizer sanitizer 45 memcheck "$SANITIZE_CASE"
    speed speed 150 headline triton,cuda,sdpa-flash,cudnn
    RESERVE=150
    gpu_tests tests
    bench_and_memory ;;
  triton)
    smoke smoke-triton 150 triton all
    speed speed 120 headline triton,sdpa-flash,cudnn
    gpu_tests tests/test_triton*.py ;;
  cuda)
    build_stage
    smoke smoke-cuda 90 cuda all
    sanitizer sanitizer 90 memcheck "$SANITIZE_CASE"
    speed speed 120 headline cuda,sdpa-flash,cudnn
    gpu_tests tests/test_cuda*.py ;;
  decode)
    build_stage
    smoke smoke-decode 150 triton,cuda decode
    speed speed-decode 150 decode triton,cuda,sdpa-flash,cudnn ;;
  sanitize)
    build_stage
    sanitizer sanitizer 240 memcheck "$SANITIZE_CASE"
    sanitizer memcheck-tiny 90 memcheck "${SMOKE[@]}" correctness --backends cuda --tiny --out "$WORK/tiny.json"
    sanitizer racecheck-tiny 150 racecheck "${SMOKE[@]}" correctness --backends cuda --tiny --out "$WORK/tiny.json" ;;
  speed)
    build_stage
    speed speed 420 all triton,cuda,sdpa-flash,cudnn ;;
  bench)
    build_stage
    bench_and_memory ;;
esac

# ---------------------------------------------------------------- summary (last)
if [ $DRY -eq 1 ]; then
  echo "worst case ${CLOCK}s of ${BUDGET}s; $OUT would get: gpu_check.log summary.txt smoke.json speed.json" \
    "build.log bench.json bench_tflops.png memory.png (those its stages write)"
  exit 0
fi
summarize
cat "$OUT/summary.txt" | tee -a "$LOG"
echo "files under $OUT:"; ls -1 "$OUT"
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: some stages FAILED -- see $LOG" >&2
  exit 1
fi
echo "gpu_check: every stage passed"
