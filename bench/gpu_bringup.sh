#!/usr/bin/env bash
# One command for a GPU session (H100 / H200; such sessions are rare and short, ~15 minutes of device time with the
# build included): build the CUDA extension, self-test every op on the GPU, run the GPU tests and the benchmarks,
# and collect everything into bench/results/<gpu-name>/{results.json, table.md, plot.png}.
#
#   bash bench/gpu_bringup.sh [--out DIR] [--results DIR] [--dry-run]
#
#   --out DIR      also copy the three result files into DIR (e.g. the device tool's $OUT)
#   --results DIR  where to write them (default bench/results/<gpu-name>; with --dry-run a temporary folder)
#   --dry-run      the same flow on the CPU: the CUDA build is skipped (the installed extension is used), the
#                  self-test runs on the CPU, and the tests / benchmarks run a small CPU selection. CI runs this
#                  (tests/test_gpu_bringup.py), so the script cannot rot between GPU sessions.
#
# Designed for the device image: Python 3.12, torch 2.11+cu130, Triton 3.6, nvcc 13, pytest, pytest-benchmark,
# hypothesis, einops, safetensors, tqdm, matplotlib; no PyAV (tests that need it skip) and NO network (pip runs
# with --no-index --no-build-isolation). Target: under 8 minutes of wall time. Budgets (seconds) can be changed
# with BRINGUP_TEST_BUDGET (default 120) and BRINGUP_BENCH_BUDGET (default 150); MAX_JOBS (default: cores) and
# NVCC_THREADS (default 4) set the build parallelism. Each step's status and time are printed; a failing step does
# not stop the later ones (a partial report beats none), and the exit code is 1 if the build or the self-test
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
RESULTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --results) RESULTS="${2:?--results needs a directory}"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_bringup.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore  # no network, ever
export DERA_FAST_VALUE_CHECKS=0 TQDM_MININTERVAL=5 PYTHONUNBUFFERED=1
TEST_BUDGET=${BRINGUP_TEST_BUDGET:-120}
BENCH_BUDGET=${BRINGUP_BENCH_BUDGET:-150}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dera_fast_bringup.XXXXXX")
STATUS="$WORK/steps.tsv"
: > "$STATUS"

step() {  # step NAME COMMAND...: run, time and record one step (never aborts the script)
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== [$name] $*"
  "$@"
  local rc=$?
  echo "=== [$name] exit $rc after $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - START )) s)"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STATUS"
  return $rc
}

budget() {  # budget SECONDS COMMAND...: SIGINT at the deadline, so pytest stops cleanly and still writes its JSON
  timeout -s INT -k 20 "$1" "${@:2}"
  local rc=$?
  [ $rc -eq 124 ] && echo "(stopped at the ${1} s budget; results so far are kept)"
  return $rc
}

# ---- 1. build -------------------------------------------------------------------------------------------------
if [ $DRY -eq 1 ]; then
  echo "=== [build] skipped (--dry-run): using the installed extension"
  printf 'build\tskipped\t0\n' >> "$STATUS"
else
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  export DERA_FAST_BUILD_EXT=cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-4}
  # editable install without network; if pip itself is unusable, build in place and import from the checkout
  if ! step build $PY -m pip install -q --no-build-isolation --no-deps --no-index -e .; then
    step build-inplace $PY setup.py -q build_ext --inplace && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
step info $PY -m dera_fast info

# ---- 2. self-test ---------------------------------------------------------------------------------------------
DEVICE=cuda
[ $DRY -eq 1 ] && DEVICE=cpu
step selftest $PY -m dera_fast selftest --device "$DEVICE" --bench --json "$WORK/selftest.json" \
  | tee "$WORK/selftest.txt"

# ---- 3. GPU tests (every op test file; CPU-only cases skip themselves) -------------------------------------------
if [ $DRY -eq 1 ]; then
  TESTS=(tests/test_attention.py -k no_quadratic_buffer)  # a CUDA-only test: it skips on the CPU
else
  TESTS=(tests/test_vq.py tests/test_attention.py tests/test_sacp.py tests/test_op_safety.py tests/test_backends.py
         tests/test_selftest.py -m "not slow")
fi
step tests budget "$TEST_BUDGET" $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
  --junitxml "$WORK/tests.xml" | tail -n 25

# ---- 4. benchmarks (one budget shared by the files; each writes its own JSON) ------------------------------------
if [ $DRY -eq 1 ]; then
  BENCHES=("bench/bench_vq.py -k cpu_grid and N64-K1024-D16")
else
  BENCHES=("bench/bench_vq.py" "bench/bench_sacp.py -k not dera_step" "bench/bench_attention.py -k not flex"
           "bench/bench_generate.py")
fi
bench_deadline=$(( $(date +%s) + BENCH_BUDGET ))
i=0
for spec in "${BENCHES[@]}"; do
  left=$(( bench_deadline - $(date +%s) ))
  [ $left -le 5 ] && { echo "=== [bench] budget spent: skipping $spec"; continue; }
  file=${spec%% *}
  args=()
  [ "$spec" != "$file" ] && args=(-k "${spec#* -k }")
  i=$((i + 1))
  step "bench-$(basename "$file" .py)" budget "$left" $PY -m pytest -q -p no:cacheprovider "$file" "${args[@]}" \
    --benchmark-json "$WORK/bench_$i.json" | tail -n 3
done

# ---- 5. report ----------------------------------------------------------------------------------------------------
step report $PY bench/bringup_report.py --work "$WORK" ${RESULTS:+--results "$RESULTS"} ${OUT:+--out "$OUT"} \
  $([ $DRY -eq 1 ] && echo --dry-run)
echo "total $(( $(date +%s) - START )) s; step log: $STATUS"
rc_of() { awk -F'\t' -v n="$1" '$1 == n {rc = $2} END {print rc}' "$STATUS"; }
build_rc=$(rc_of build)
[ "$build_rc" != "0" ] && [ "$build_rc" != "skipped" ] && build_rc=$(rc_of build-inplace)
if [ "$build_rc" != "0" ] && [ "$build_rc" != "skipped" ]; then echo "FAILED: the build"; exit 1; fi
if [ "$(rc_of selftest)" != "0" ]; then echo "FAILED: the self-test (see selftest.txt)"; exit 1; fi
exit 0
