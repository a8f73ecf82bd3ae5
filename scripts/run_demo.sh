#!/usr/bin/env bash
# Main job on the embedded default: set up the environment, then adapt the small trained teacher
# (train it once, cached in .cache/) with null experts: stage 1, stage 2 (2 processes, EP=2),
# export, evaluation and a report in runs/demo/report/. Re-running reuses what exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# megatron-core warns once per process about optional fused kernels (TE/Apex) it falls back from.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning}
exec .venv/bin/python -m zeda_megatron.demo "$@"
