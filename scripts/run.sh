#!/usr/bin/env bash
# Set up a virtual environment with fastenc built in it, then run a job.
#
#   bash scripts/run.sh test  [pytest args]   # the test suite (CPU: Triton kernels under the interpreter), then
#                                             # the CPU kernel tests under each lower CPU capability this CPU runs
#   bash scripts/run.sh bench [bench args]    # python -m fastenc bench (small on CPU, full on a GPU)
#   bash scripts/run.sh wheel [pytest args]   # build a wheel, install it into a fresh environment with no
#                                             # compiler on PATH, and run the CPU kernel and model tests there
#   bash scripts/run.sh setup                 # only build the environment
#
# VENV (default .venv) and PYTHON (default python3) pick the environment; the setup is
# idempotent and installs the pinned torch, so the CUDA extension compiles and links
# even on a machine without a GPU.  A rerun with unchanged sources skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"
shift || true
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.fastenc-deps-$(cat requirements/dev.txt requirements/test.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r requirements/dev.txt
  touch "$stamp"
fi
# Rebuild only when an input of the build changed (build_tools/build_stamp.py says which); then ninja
# recompiles only the changed objects in build/.  --no-build-isolation: against the torch installed above.
build_stamp="$VENV/.fastenc-build.json"
if "$PY" -m build_tools.build_stamp check "$build_stamp"; then
  echo "fastenc: extension up to date (same sources, flags and toolchain as the last build): not rebuilt"
else
  start=$(date +%s)
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  "$PY" -m build_tools.build_stamp commit "$build_stamp"
  echo "fastenc build + install: $(( $(date +%s) - start )) s"
fi

has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$has_gpu" = "0" ]; then
  export TRITON_INTERPRET=1
fi

# The tests of the C++ CPU kernels, rerun under each capability below this CPU's.
CPU_KERNEL_TESTS=(tests/test_attention_cpu.py tests/test_layer_norm_cpu.py tests/test_ffn.py tests/test_linear_cpu.py
                  tests/test_linear.py tests/test_encoder.py tests/test_panel_gemm.py tests/test_linear_int8.py
                  tests/test_cpu_dispatch.py tests/test_embeddings.py tests/test_pooler.py tests/test_quantize.py)

case "$job" in
  setup) ;;
  test)
    "$PY" -c "import fastenc; print(fastenc.backend_report())"
    "$PY" -m pytest tests benchmarks -q -n "${PYTEST_WORKERS:-2}" --benchmark-disable "$@"
    # Run-time CPU dispatch: fastenc's kernels (FASTENC_CPU_CAPABILITY) and oneDNN's GEMMs (ONEDNN_MAX_CPU_ISA)
    # capped to each lower capability the extension has kernels for, so the AVX2 path is tested on an AVX-512 CPU.
    lower=$("$PY" -m build_tools.cpu_kernels lower)
    while read -r cap onednn; do
      [ -n "$cap" ] || continue
      echo "fastenc: CPU kernel tests at FASTENC_CPU_CAPABILITY=$cap ONEDNN_MAX_CPU_ISA=$onednn"
      FASTENC_CPU_CAPABILITY="$cap" ONEDNN_MAX_CPU_ISA="$onednn" "$PY" -m pytest "${CPU_KERNEL_TESTS[@]}" -q \
        -n "${PYTEST_WORKERS:-2}" "$@" < /dev/null
    done <<< "$lower"
    ;;
  wheel)
    # The wheel route (README, "Install"): `pip wheel` of this build (ninja reuses the objects in build/), installed
    # with the pinned torch into a fresh environment whose PATH has no compiler, run from a copy of the tests
    # outside the source tree (so that `import fastenc` is the installed wheel).
    start=$(date +%s)
    rm -rf dist
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w dist .
    WV="$(pwd)/${WHEEL_VENV:-.venv-wheel}"
    rm -rf "$WV"
    "$PYTHON" -m venv "$WV"
    torch_pin=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
    # The pinned torch with its nvidia-* and triton wheels (5.3 GB) hard-linked from this environment, where pip
    # unpacked the same wheels: a second copy filled CI's disk.  pip finds torch==pin met and installs the rest.
    "$PY" -m build_tools.link_installed "torch==$torch_pin" \
      --into "$("$WV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
    "$WV/bin/python" -m pip install -q dist/fastenc-*.whl "torch==$torch_pin" -r requirements/test.txt
    "$WV/bin/python" -m pip check
    echo "fastenc wheel $(basename dist/fastenc-*.whl): built and installed in $(( $(date +%s) - start )) s"
    run=$(mktemp -d)
    cp -r tests build_tools pyproject.toml "$run/"
    tools="$run/bin"  # PATH for the run: the environment's bin and a few shell tools, no compiler
    mkdir -p "$tools"
    for t in sh bash env uname cat ls rm mkdir ldconfig; do
      p=$(command -v "$t" || true)
      if [ -n "$p" ]; then ln -s "$p" "$tools/$t"; fi
    done
    (
      cd "$run"
      export PATH="$WV/bin:$tools"
      for cc in cc c++ gcc g++ clang nvcc; do
        if command -v "$cc" > /dev/null; then echo "a compiler ($cc) is on PATH" >&2; exit 1; fi
      done
      "$WV/bin/python" -c "import fastenc, sys; assert 'site-packages' in fastenc.__file__, fastenc.__file__; \
print(fastenc.__file__); print(fastenc.backend_report())"
      "$WV/bin/python" -m pytest "${CPU_KERNEL_TESTS[@]}" tests/test_hf.py tests/test_quantize.py tests/test_ecosystem.py \
        -q -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@"
    )
    ;;
  bench)
    exec "$PY" -m fastenc bench "$@"
    ;;
  *)
    echo "unknown job '$job' (expected test, wheel, bench or setup)" >&2
    exit 2
    ;;
esac
