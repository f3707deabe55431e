#!/usr/bin/env bash
# The GPU check (issue 12): build, real-GPU tests, compute-sanitizer, benchmarks,
# in ONE command of at most ~8 minutes on an H200 machine (torch 2.11+cu130, nvcc
# 13.0, no package registry). Run from anywhere; it works in the repository root.
#
#   bash benchmarks/gpu/check.sh             # on the GPU machine; OUT=./gpu-out by default
#   bash benchmarks/gpu/check.sh --dry-run   # tiny sizes, CPU, same steps and files (CI)
#
# Steps, each in its own time box (timeout), so that a hang in one still returns the
# rest; the boxes come out of one budget ($DUO_GPU_CHECK_BUDGET_S, default 450 s):
#   env        machine, versions, commit ($DUO_FAST_COMMIT, else git)
#   build      sm_90 only, 16 jobs, in place, against the machine's torch; the import
#              check of duo_fast._build_info.json (dry run: setup.py --version + import)
#   tests      pytest -m cuda: the real-GPU twins of the emulated tests (junit)
#   sanitizer  compute-sanitizer memcheck, then racecheck, over one small call of every
#              kernel (duo_fast/bench/gpu_sanitize.py); runs beside the tests
#   bench      duo_fast/bench/gpu_bench.py: every op vs the Duo code (eager, torch.compile)
#   report     $OUT/gpu_report.md, $OUT/gpu_results.json (after every step), a short
#              table printed last
# Files in $OUT (at most 8: the device tool brings back 8): gpu_log.txt, gpu_report.md,
# gpu_results.json, gpu_tests_junit.xml, gpu_sanitizer.txt, gpu_build.log.
# Environment: PYTHON (default python3), OUT, DUO_GPU_CHECK_BUDGET_S, DUO_FAST_COMMIT,
# DUO_REFERENCE_DIR (the Duo code; ./.duo-reference is used when present, e.g. carried).
set -u
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/gpu-out}  # a relative OUT is taken from the caller's folder
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
# the interpreter's own bin folder first: cmake, ninja, pytest of its environment
PY_BIN=$(dirname "$(command -v "$PY" 2>/dev/null || echo "$PY")")
[ -d "$PY_BIN" ] && export PATH="$PY_BIN:$PATH"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/duo_gpu_check.XXXXXX")
LOG=$OUT/gpu_log.txt
: > "$LOG"
BUDGET=${DUO_GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${DUO_REFERENCE_DIR:-}" ] && [ -f "$ROOT/.duo-reference/algo.py" ]; then
  export DUO_REFERENCE_DIR="$ROOT/.duo-reference"
fi
TEST_EXPR="cuda"
if [ "$DRY" = 1 ]; then
  # the dry run measures against the eager copy of the Duo code (importing the Duo code
  # itself takes seconds; tests/test_bench.py checks the copy against it)
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 DUO_FAST_BENCH_REFERENCE=${DUO_FAST_BENCH_REFERENCE:-eager}
fi

now() { date +%s; }
elapsed() { echo $(( $(now) - START )); }
left() { echo $(( START + BUDGET - $(now) )); }
log() { echo "[check +$(elapsed)s] $*" | tee -a "$LOG"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }
record() {  # name status seconds box detail
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$WORK/steps.tsv"
}
report() {
  "$PY" "$ROOT/duo_fast/bench/report.py" --work "$WORK" --out "$OUT" "$@" 2>>"$LOG" || echo "[check] report failed" | tee -a "$LOG"
}
boxed() {  # seconds cmd...: run in a time box; 124 = timed out
  local box=$1; shift
  timeout -k 10 "$box" "$@"
}
status_of() {  # rc -> status word
  case "$1" in 0) echo ok ;; 124|137) echo "timed out" ;; *) echo "failed (rc $1)" ;; esac
}

log "duo_fast GPU check$([ "$DRY" = 1 ] && echo ' (DRY RUN)') in $ROOT, work folder $WORK, budget ${BUDGET}s"

# ---- env -------------------------------------------------------------------------------
t0=$(now)
COMMIT=${DUO_FAST_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "unknown (no .git here: set DUO_FAST_COMMIT)")}
DRY="$DRY" COMMIT="$COMMIT" TEST_EXPR="$TEST_EXPR" boxed 30 "$PY" - > "$WORK/env.json" 2>>"$LOG" <<'EOF'
import datetime, importlib.metadata as md, json, os, platform, shutil, subprocess
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
try:
    tv = md.version("torch")
except md.PackageNotFoundError:
    tv = "not installed"
smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else ""
parts = [p.strip() for p in smi.split(",")] if smi and "," in smi else []
env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": os.environ["COMMIT"], "dry_run": os.environ["DRY"] == "1",
    "gpu": (parts[0] + (f" ({parts[2]})" if len(parts) > 2 else "")) if parts else "none",
    "driver": parts[1] if len(parts) > 1 else "",
    "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
    "torch": tv, "torch_cuda": tv.split("+cu")[1] if "+cu" in tv else "",
    "nvcc": (run(["nvcc", "--version"]).splitlines() or [""])[-1] if shutil.which("nvcc") else "not found",
    "compute_sanitizer": (run(["compute-sanitizer", "--version"]).splitlines() or [""])[-1] if shutil.which("compute-sanitizer") else "not found",
    "test_selection": "pytest tests -m " + os.environ["TEST_EXPR"],
}
print(json.dumps(env, indent=1))
EOF
rc=$?
record env "$(status_of $rc)" $(( $(now) - t0 )) 30
cat "$WORK/env.json" >> "$LOG"
report

# ---- build -----------------------------------------------------------------------------
t0=$(now)
if [ "$DRY" = 1 ]; then
  BOX=60
  log "build: dry run: no compile; setup.py --version (configuration code) and the import check of the existing build"
  { boxed $BOX env DUO_FAST_CUDA=1 DUO_FAST_CUDA_ARCHS=9.0 DUO_FAST_BUILD_JOBS=16 "$PY" setup.py --version; } > "$WORK/build.log" 2>&1
  rc=$?
  DETAIL="dry run: not compiled (would run: DUO_FAST_CUDA=1 DUO_FAST_CUDA_ARCHS=9.0 DUO_FAST_BUILD_JOBS=16 $PY setup.py build_ext --inplace)"
else
  BOX=$(min 240 $(max 60 $(( $(left) - 230 ))))
  log "build: sm_90, 16 jobs, in place (time box ${BOX}s)"
  boxed $BOX env DUO_FAST_CUDA=1 DUO_FAST_CUDA_ARCHS=9.0 DUO_FAST_BUILD_JOBS=16 "$PY" setup.py build_ext --inplace \
    > "$WORK/build.log" 2>&1
  rc=$?
  DETAIL="DUO_FAST_CUDA=1 DUO_FAST_CUDA_ARCHS=9.0 DUO_FAST_BUILD_JOBS=16 setup.py build_ext --inplace"
fi
tail -n 5 "$WORK/build.log" | tee -a "$LOG"
# the import check (issue 13): duo_fast compares _build_info.json with the running torch
boxed 60 "$PY" -c "import json, duo_fast; print(json.dumps(duo_fast.build_info()))" > "$WORK/build_info.json" 2>> "$WORK/build.log"
irc=$?
BUILD_STATUS=$(status_of $rc)
if [ $irc -ne 0 ]; then
  BUILD_STATUS="$BUILD_STATUS; import FAILED"
elif [ "$DRY" = 0 ] && ! grep -q '"cuda": true' "$WORK/build_info.json"; then
  BUILD_STATUS="$BUILD_STATUS; no CUDA kernels in the build"
fi
cat "$WORK/build_info.json" >> "$LOG"
record build "$BUILD_STATUS" $(( $(now) - t0 )) $BOX "$DETAIL"
cp "$WORK/build.log" "$OUT/gpu_build.log"
report

# ---- tests and sanitizer, side by side -------------------------------------------------
t0=$(now)
if [ "$DRY" = 1 ]; then BOX=90; else BOX=$(min 150 $(max 40 $(( $(left) - 190 )))); fi
log "tests (pytest -m $TEST_EXPR) and sanitizer, side by side (time box ${BOX}s each)"
TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=120"
(
  boxed $BOX "$PY" -m pytest tests -m "$TEST_EXPR" -q -rfE -p no:cacheprovider $TIMEOUT_OPT \
    --junitxml="$WORK/tests_junit.xml" -o junit_family=xunit1 > "$WORK/tests.log" 2>&1
  echo $? > "$WORK/tests.rc"
) &
TESTS_PID=$!
(
  half=$(( BOX / 2 ))
  if [ "$DRY" = 1 ]; then
    { echo "DRY RUN: the calls on the CPU, without compute-sanitizer";
      boxed $half "$PY" -m duo_fast.bench.gpu_sanitize --device cpu; echo "exit $?"; } > "$WORK/sanitizer_memcheck.log" 2>&1
    cp "$WORK/sanitizer_memcheck.log" "$WORK/sanitizer_racecheck.log"
  elif ! command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do echo "compute-sanitizer not found" > "$WORK/sanitizer_$tool.log"; done
  else
    FILTER=""
    compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && FILTER="--kernel-name kns=duo_fast"
    # memcheck: every kernel (torch's too), each tensor its own allocation so that an
    # out-of-bounds access is not hidden inside a pooled block
    { boxed $half env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --print-limit 30 \
        "$PY" -m duo_fast.bench.gpu_sanitize --device cuda; rc=$?; [ $rc = 124 ] && echo "timed out"; echo "exit $rc"; } \
      > "$WORK/sanitizer_memcheck.log" 2>&1
    # racecheck: shared-memory hazards of duo_fast's kernels (filtered: torch's are not ours)
    { echo "racecheck filter: ${FILTER:-none}";
      boxed $half compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 30 $FILTER \
        "$PY" -m duo_fast.bench.gpu_sanitize --device cuda; rc=$?; [ $rc = 124 ] && echo "timed out"; echo "exit $rc"; } \
      > "$WORK/sanitizer_racecheck.log" 2>&1
  fi
) &
SAN_PID=$!
wait $TESTS_PID
TRC=$(cat "$WORK/tests.rc" 2>/dev/null || echo 1)
# pytest: 0 all passed, 1 some failed, 5 nothing collected
case "$TRC" in 0) TS=ok ;; 1) TS="failures" ;; 5) TS="no tests selected" ;; *) TS=$(status_of "$TRC") ;; esac
tail -n 15 "$WORK/tests.log" | tee -a "$LOG"
record tests "$TS" $(( $(now) - t0 )) $BOX "pytest tests -m $TEST_EXPR"
report
wait $SAN_PID
for tool in memcheck racecheck; do
  { echo "==== $tool"; cat "$WORK/sanitizer_$tool.log" 2>/dev/null; } >> "$OUT/gpu_sanitizer.txt"
  tail -n 4 "$WORK/sanitizer_$tool.log" 2>/dev/null | sed "s/^/[$tool] /" | tee -a "$LOG"
done
record sanitizer "done" $(( $(now) - t0 )) $BOX "memcheck then racecheck, $(( BOX / 2 ))s each"
[ -f "$WORK/tests_junit.xml" ] && cp "$WORK/tests_junit.xml" "$OUT/gpu_tests_junit.xml"
report

# ---- bench -----------------------------------------------------------------------------
t0=$(now)
if [ "$DRY" = 1 ]; then BOX=150; else BOX=$(max 30 $(( $(left) - 15 ))); fi
log "bench (time box ${BOX}s)"
DEADLINE=$(( $(now) + BOX - 10 ))
boxed $BOX "$PY" -m duo_fast.bench.gpu_bench --out "$WORK/bench.jsonl" --deadline $DEADLINE \
  $([ "$DRY" = 1 ] && echo --dry-run) 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
record bench "$(status_of $rc)" $(( $(now) - t0 )) $BOX "$(grep -c '"kind": "side"' "$WORK/bench.jsonl" 2>/dev/null || echo 0) sides measured or skipped"

# ---- report ----------------------------------------------------------------------------
log "report: $OUT/gpu_report.md, $OUT/gpu_results.json (total $(elapsed)s)"
report --final | tee -a "$LOG"
exit 0
