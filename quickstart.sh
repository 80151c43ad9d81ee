#!/usr/bin/env bash
# Set up (once) and run: `./quickstart.sh parity` or `./quickstart.sh test`.
# Needs only Python 3 and pip. The environment lives in .venv.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.flax-resnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch is pinned to the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/python -m pip install -q -e ".[torch,test]" "torch==2.13.0"
    touch "$stamp"
fi
case "${1:-}" in
    parity) shift; exec .venv/bin/flax-resnet parity "$@" ;;
    test) shift; exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist worksteal -m "slow or not slow" "$@" ;;  # both tiers
    *) echo "usage: $0 parity [ARGS...] | test [PYTEST ARGS...]" >&2; exit 2 ;;
esac
