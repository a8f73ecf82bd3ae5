#!/bin/bash
# Benchmark the null-expert MoE layer against the stock layer on one node (EP across its GPUs).
#   sbatch slurm/bench_moe_layer.sh            # or: GPUS=4 sbatch --gpus-per-node=4 slurm/bench_moe_layer.sh
#SBATCH --job-name=zeda-bench-moe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=00:20:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
bash scripts/setup.sh
GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-8}}
srun .venv/bin/torchrun --nproc_per_node "$GPUS" tools/bench_moe_layer.py --ep "$GPUS" \
  --experts 64 --null-experts 32 --topk 4 --hidden 2048 --ffn 1536 --tokens 8192 "$@"
