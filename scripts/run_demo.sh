#!/usr/bin/env bash
# Main job on the embedded default: set up the environment, then run the demonstration under
# torchrun with 2 processes and expert parallelism 2 (gloo on CPU, NCCL on GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# megatron-core warns once per process about optional fused kernels (TE/Apex) it falls back from.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning}
exec .venv/bin/torchrun --nproc_per_node "${NPROC:-2}" -m zeda_megatron.demo "$@"
