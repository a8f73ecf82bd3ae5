#!/bin/bash
# ZEDA on GLM-4.7-Flash (64 real + 32 null experts, 50% null target), one 8-GPU node, both stages.
#   HF_DIR=/ckpt/GLM-4.7-Flash SFT_DATA=data/glm_rollouts.jsonl PROMPTS=data/prompts.jsonl sbatch slurm/adapt_glm.sh
# Extra Hydra overrides: EXTRA="model.null_experts.weight=1.5 logging.wandb.mode=online" (both stages),
# SFT_ARGS / OPD_ARGS (one stage). DRY_RUN=1 bash slurm/adapt_glm.sh prints the commands.
#SBATCH --job-name=zeda-glm47-flash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
export MODEL=glm47_flash
exec bash "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/adapt.sh"
