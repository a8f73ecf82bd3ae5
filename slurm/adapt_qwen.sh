#!/bin/bash
# ZEDA on Qwen3-30B-A3B (128 real + 64 null experts, 50% null target), one 8-GPU node, both stages.
#   HF_DIR=/ckpt/Qwen3-30B-A3B SFT_DATA=data/qwen_rollouts.jsonl PROMPTS=data/prompts.jsonl sbatch slurm/adapt_qwen.sh
# Extra Hydra overrides: EXTRA="model.null_experts.weight=1.5 logging.wandb.mode=online" (both stages),
# SFT_ARGS / OPD_ARGS (one stage). DRY_RUN=1 bash slurm/adapt_qwen.sh prints the commands.
#SBATCH --job-name=zeda-qwen3-30b-a3b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
export MODEL=qwen3_30b_a3b
exec bash "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/adapt.sh"
