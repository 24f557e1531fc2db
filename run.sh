#!/usr/bin/env bash
# ./run.sh [main]  set up .venv (when missing or half built) and run the main job on the offline default (:tiny)
# ./run.sh test    set up .venv with the test requirements and run the whole test suite
# Extra arguments are passed on: to mltd_jax.main (e.g. --config.meta.steps=100) or to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
mode=main
case "${1:-}" in
  test|main) mode=$1; shift ;;
esac

setup() {  # $1: requirements file
  if ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    if ! command -v "$PY" >/dev/null; then
      echo "run.sh: no $PY; install Python >= 3.11 or set PYTHON to one" >&2
      exit 2
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "run.sh: $("$PY" --version 2>&1) is too old; Python >= 3.11 is needed (set PYTHON=python3.11 or newer)" >&2
      exit 2
    fi
    "$PY" -m venv --clear .venv  # missing, or half built (a venv killed before pip was in)
  fi
  local stamp=".venv/.installed-$(basename "$1")"
  if [ ! -f "$stamp" ] || [ "$1" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r "$1"
    touch "$stamp"
  fi
}

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the defaults never reach the hub; unset to download models
export PYTHONUNBUFFERED=1
# Huge pages for XLA:CPU's step buffers (mltd_jax/hostmem.py): glibc reads this when a process starts. An
# explicit glibc.malloc.hugetlb=... of yours is kept (hugetlb=0 turns it off).
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
case "$mode" in
  test)
    setup requirements-test.txt
    # Two workers (pytest-xdist): XLA compiles on one thread, so a second process keeps both cores busy. Each test
    # file runs on one worker (--dist loadfile), so a module-scoped fixture is built once. TEST_WORKERS=0: no workers.
    # No path here: pytest.ini's testpaths (tests/) applies unless you name files (./run.sh test tests/test_meta.py).
    exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  main)
    setup requirements.txt
    exec .venv/bin/python -m mltd_jax.main --config=configs/multidomain_lm.py:tiny --workdir="${WORKDIR:-runs/tiny}" "$@"
    ;;
  *)
    echo "usage: ./run.sh [main|test] [extra args]" >&2
    exit 2
    ;;
esac
