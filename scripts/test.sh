#!/usr/bin/env bash
# Set up the environment, then run the test suite (CPU, gloo; multi-process tests spawn locally).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
