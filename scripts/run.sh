#!/usr/bin/env bash
# Set up a virtual environment with fastenc built in it, then run a job.
#
#   bash scripts/run.sh test  [pytest args]   # the test suite (CPU: Triton kernels under the interpreter)
#   bash scripts/run.sh bench [bench args]    # python -m fastenc bench (small on CPU, full on a GPU)
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
stamp="$VENV/.fastenc-deps-$(cat requirements/dev.txt pyproject.toml | sha1sum | cut -c1-12)"
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

case "$job" in
  setup) ;;
  test)
    "$PY" -c "import fastenc; print(fastenc.backend_report())"
    exec "$PY" -m pytest tests benchmarks -q -n "${PYTEST_WORKERS:-2}" --benchmark-disable "$@"
    ;;
  bench)
    exec "$PY" -m fastenc bench "$@"
    ;;
  *)
    echo "unknown job '$job' (expected test, bench or setup)" >&2
    exit 2
    ;;
esac
