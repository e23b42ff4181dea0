#!/usr/bin/env bash
# One-command GPU suite: build the extension for this GPU, run the tests on CUDA (with the bad-input
# matrix of tests/test_hostile.py), memcheck its crash-prone cases when compute-sanitizer is installed,
# measure the device ceilings, then the full benchmark; logs, JSON, CSV and plots under OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR            # on a GPU machine: under 8 minutes on one H200
#   bash benchmarks/gpu_suite.sh --dry-run OUTDIR  # on a CPU: every step on tiny sizes (CI runs this)
#
# Nothing is downloaded: it uses the torch/Triton already installed (torch 2.11+, Triton 3.6+).
# Each stage runs under `timeout`; a failed stage is recorded and the next one still runs; the exit
# status is 1 if any stage failed.  The benchmark gets the time the earlier stages left.
# CUTLASS sm90 kernels: linked from .prebuilt/cutlass/ when it exists (scripts/prebuild_cutlass.py,
# carried to the device; see benchmarks/README.md), else compiled if CUTLASS headers are installed
# (minutes: the build timeout grows to 360 s), else the build goes without them and summary.txt says so.
#
# The dry run checks that every stage works, not how long it takes: each stage gets 10 minutes.
#
# Environment:
#   FASTENC_SUITE_DRY_RUN=1     same as --dry-run
#   FASTENC_SUITE_TOTAL_S       wall-clock budget for all stages (default 450)
#   FASTENC_SUITE_BUILD_S / _TESTS_S / _MEMCHECK_S / _CEILINGS_S   per-stage timeouts (default 150 / 150 /
#                               120 / 30; build 360 when CUTLASS compiles from source)
#   FASTENC_SUITE_BENCH_MAX_S   longest benchmark (default 300)
#   FASTENC_SUITE_TESTS         pytest arguments (default: tests/; dry run: a few quick tests)
#   FASTENC_SUITE_WORKERS       pytest-xdist workers when xdist is installed (default 8; dry run 2; 0: none)
#   FASTENC_SUITE_PREBUILT      prebuilt CUTLASS objects (default: .prebuilt/cutlass in the repo)
#   FASTENC_SUITE_OPS           benchmark suites (default: all)
#   FASTENC_SUITE_SKIP_BUILD=1  use the extension already built
#   FASTENC_SUITE_SKIP_INSPECT=1  skip the kernel inspector stage
#   PYTHON                      interpreter (default: python)
set -uo pipefail

DRY_RUN="${FASTENC_SUITE_DRY_RUN:-0}"
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "gpu_suite.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
if [ -z "$OUT" ]; then
    echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] OUTDIR" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
START=$(date +%s)
TOTAL="${FASTENC_SUITE_TOTAL_S:-450}"
FAILED=0
: > "$OUT/summary.txt"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }

# stage NAME TIMEOUT_S CMD...: run under timeout, log to OUTDIR/logs/NAME.log, record the outcome.
stage() {
    local name="$1" limit="$2"
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo "=== [$(elapsed)s] $name (timeout ${limit}s): $*"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="timeout"; FAILED=1 ;;
        *) status="failed (exit $rc)"; FAILED=1 ;;
    esac
    printf '%-10s %-18s %4ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    /'
    return 0
}

if [ "$DRY_RUN" = "1" ]; then
    echo "gpu_suite: dry run on CPU (tiny sizes, Triton interpreter; no time limits but a generous 10 min each)"
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu
    SIZE=tiny
    STAGE_S=600
    TOTAL=$(( TOTAL > 3600 ? TOTAL : 3600 ))
    TESTS="${FASTENC_SUITE_TESTS:-tests/test_cli.py -k formulas}"
else
    DEVICE=cuda
    SIZE=gpu
    TESTS="${FASTENC_SUITE_TESTS:-tests/}"
    STAGE_S=""
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_suite: no CUDA GPU visible to torch (use --dry-run on a CPU machine)" >&2
        exit 2
    fi
fi

# ---------------------------------------------------------------- environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
    if [ "$DEVICE" = cuda ]; then nvidia-smi 2>&1 || true; fi
} > "$OUT/env.txt" 2>&1

# ---------------------------------------------------------------- 1. build the extension for this GPU
if [ "$DEVICE" = cuda ]; then
    ARCH=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")
else
    ARCH=90a  # what an H100/H200 build uses; the dry run only shows the command
fi
# CUTLASS: prebuilt objects (setup.py checks their stamps, build_tools/cutlass_objects.py, and recompiles
# stale ones), else headers to compile from, else none.
PREBUILT="${FASTENC_SUITE_PREBUILT:-$ROOT/.prebuilt/cutlass}"
CUTLASS_ENV=()
BUILD_S_DEFAULT=150
if [ "$ARCH" != "90a" ]; then
    CUTLASS_MODE="not applicable (sm_$ARCH)"
elif compgen -G "$PREBUILT/*.o" > /dev/null; then
    CUTLASS_MODE="prebuilt ($PREBUILT)"
    CUTLASS_ENV=(FASTENC_CUTLASS_PREBUILT="$PREBUILT")
elif [ -n "${FASTENC_CUTLASS_DIR:-}" ] || "$PY" -c "import cutlass_library" 2>/dev/null; then
    CUTLASS_MODE="compiled from source (no $PREBUILT; minutes of nvcc)"
    BUILD_S_DEFAULT=360
else
    CUTLASS_MODE="NONE"
    CUTLASS_ENV=(FASTENC_NO_CUTLASS=1)
    echo "WARNING: building WITHOUT the CUTLASS sm90 kernels: no $PREBUILT (scripts/prebuild_cutlass.py) and no" \
         "CUTLASS headers; the FFN's fused erf-GELU path (FASTENC_FFN_GEMM=cutlass) is absent" | tee -a "$OUT/summary.txt"
fi
echo "cutlass: $CUTLASS_MODE"
BUILD_CMD=(env FASTENC_CUDA_ARCHS="$ARCH" ${CUTLASS_ENV[@]+"${CUTLASS_ENV[@]}"} MAX_JOBS="${MAX_JOBS:-$(nproc)}"
           "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .)
EXT_CHECK="import fastenc, fastenc.backends as b; e = b.extension(); print('fastenc from', fastenc.__file__); \
print('extension:', 'built' if e is not None else 'NOT built'); \
print('cutlass sm90:', 'built' if e is not None and e.cutlass_sm90_built() else 'NOT built')"
if [ "${FASTENC_SUITE_SKIP_BUILD:-0}" = "1" ]; then
    echo "build      skipped (FASTENC_SUITE_SKIP_BUILD=1)" | tee -a "$OUT/summary.txt"
elif [ "$DRY_RUN" = "1" ]; then
    stage build "$STAGE_S" bash -c "echo 'would run: ${BUILD_CMD[*]}'; $PY -c \"$EXT_CHECK\""
else
    # pip (also installs the console script); the in-place build if pip cannot run offline here.
    stage build "${FASTENC_SUITE_BUILD_S:-$BUILD_S_DEFAULT}" bash -c \
        "(${BUILD_CMD[*]} || env FASTENC_CUDA_ARCHS=$ARCH ${CUTLASS_ENV[*]} $PY setup.py build_ext --inplace) && $PY -c \"$EXT_CHECK\""
fi
# What the build gave (a stale prebuilt object is recompiled, or dropped without headers: setup.py says why).
CUTLASS_BUILT=$(grep -o "cutlass sm90: .*" "$OUT/logs/build.log" 2>/dev/null | tail -n 1)
printf '%-10s %s; %s\n' cutlass "$CUTLASS_MODE" "${CUTLASS_BUILT:-cutlass sm90: unknown (build skipped)}" \
    | tee -a "$OUT/summary.txt"
grep -h "building WITHOUT the CUTLASS\|CUTLASS: compiling" "$OUT/logs/build.log" 2>/dev/null \
    | awk '!seen[$0]++ { print "    " $0 }' | tee -a "$OUT/summary.txt"  # pip runs setup.py more than once

# ---------------------------------------------------------------- 2. the test suite on this device
# pytest-xdist when installed: Triton's JIT compiles are CPU-bound and the GPU has room for 8 contexts.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${FASTENC_SUITE_WORKERS:-$([ "$DRY_RUN" = "1" ] && echo 2 || echo 8)}")
fi
# shellcheck disable=SC2086  # TESTS holds several pytest arguments
stage tests "${STAGE_S:-${FASTENC_SUITE_TESTS_S:-150}}" "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
    --junitxml="$OUT/tests.xml" $TESTS

# ---------------------------------------------------------------- 2b. memcheck of the kernels that read caller-chosen rows
# The crash-prone cases of tests/test_hostile.py (packed attention's cu_seqlens, padding maps, empty and
# padding-only batches) under compute-sanitizer: an out-of-bounds access fails the stage even when the
# values come out right.  No caching allocator, so that each tensor is its own allocation.
if command -v compute-sanitizer > /dev/null 2>&1; then
    stage memcheck "${STAGE_S:-${FASTENC_SUITE_MEMCHECK_S:-120}}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m tests.test_hostile
else
    echo "memcheck   skipped (compute-sanitizer is not on PATH)" | tee -a "$OUT/summary.txt"
fi

# ---------------------------------------------------------------- 3. device ceilings
stage ceilings "${STAGE_S:-${FASTENC_SUITE_CEILINGS_S:-30}}" "$PY" -m fastenc ceilings --device "$DEVICE" --out "$OUT"

# ---------------------------------------------------------------- 4. the benchmark, in the time left
BENCH_MAX="${STAGE_S:-${FASTENC_SUITE_BENCH_MAX_S:-300}}"
BENCH_S=$(( $(left) - 30 ))  # the workload in flight at the budget, then the plots
[ "$BENCH_S" -gt "$BENCH_MAX" ] && BENCH_S="$BENCH_MAX"
[ "$BENCH_S" -lt 30 ] && BENCH_S=30
# The sweep stops starting new workloads at the budget; the timeout (20 s later) is the backstop,
# and its SIGTERM still makes the benchmark write what it measured.
stage bench $(( BENCH_S + 20 )) "$PY" -m fastenc bench --size "$SIZE" --device "$DEVICE" \
    --ops "${FASTENC_SUITE_OPS:-attention,layer_norm,ffn,layer,encoder,train}" \
    --out "$OUT/bench" --time-budget "$BENCH_S" --no-progress \
    $( [ -f "$OUT/ceilings.json" ] && echo --ceilings "$OUT/ceilings.json" )

# ---------------------------------------------------------------- 5. kernel resources (if time is left)
if [ "${FASTENC_SUITE_SKIP_INSPECT:-0}" != "1" ] && [ "$(left)" -gt 30 ]; then
    stage inspect $(( $(left) - 5 )) "$PY" -m fastenc inspect --arch "sm_${ARCH%a}" --json "$OUT/inspect.json"
fi

echo "total      $(elapsed)s" | tee -a "$OUT/summary.txt"
echo "gpu_suite: results in $OUT (summary.txt, logs/, bench/, ceilings.json)"
exit $FAILED
