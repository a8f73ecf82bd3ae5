#!/bin/bash
# ZEDA on GLM-4.7-Flash (64 real + 32 null experts, 50% null target): the whole adaptation in one job, on one 8-GPU node
# with the reference's hyper-parameters (docs/method.md sections 4-5):
#   sbatch slurm/adapt_glm.sh model.hf_dir=/ckpt/GLM-4.7-Flash data.prompts=/data/ZEDA-prompts-60k.jsonl
# Phases: check -> convert -> generate -> prepare -> sft -> opd -> export -> evaluate (RUN/logs/N-phase.log each);
# a requeued or resubmitted job (same job.run_dir) skips what is complete and resumes the rest.
# Arguments are Hydra overrides: both stages (model.null_experts.ratio=0.25, logging.wandb.mode=online),
# one stage (sft.trainer.max_steps=100, opd.optim.lr=2e-6), a phase (generate.temperature=0.7), the job
# (job.run_dir=runs/mine, job.phases=sft,opd). DRY_RUN=1 bash slurm/adapt_glm.sh prints the plan.
# More nodes: sbatch --nodes=2 slurm/adapt_glm.sh ... (srun + torchrun rendezvous from Slurm's environment).
# Environment: PYTHON (default .venv/bin/python of this repository), SRUN_ARGS (e.g. --container-image=...).
# The signal lead time (B:USR1@N) must cover the longest step plus a checkpoint save; job.grace_s=N must
# match it (the job prints what it measured after each stage; docs/slurm.md has the figures).
#SBATCH --job-name=zeda-glm47-flash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
export FAMILY=glm
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${ZEDA_HOME:-}" ]; then
  exec bash "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)")/adapt.sh" "$@"
fi
exec bash "${ZEDA_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/slurm/adapt.sh" "$@"
