#!/bin/bash
# Shared body of slurm/adapt_{glm,qwen}.sh: stage 1 (off-policy) then stage 2 (on-policy), each a
# torchrun job step over all allocated nodes/GPUs, both resumable. Not meant to be submitted alone.
#
# Requeue protocol: Slurm sends SIGTERM to the job steps before the time limit (--signal=TERM@...);
# torchrun forwards it to every rank; the trainer saves a checkpoint and exits cleanly. This script
# then requeues the job (scontrol requeue); the requeued job re-enters here, each stage resumes from
# its latest checkpoint (trainer.resume=auto in the same run folder) and a finished stage is skipped.
set -euo pipefail
: "${MODEL:?}" "${HF_DIR:?set HF_DIR to the original model's Hugging Face directory}"
: "${SFT_DATA:?set SFT_DATA to a JSONL of {prompt,response} (the teacher's own responses)}"
: "${PROMPTS:?set PROMPTS to a JSONL of {prompt} for on-policy distillation}"
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RUN=${RUN:-runs/${MODEL}-${SLURM_JOB_ID:-local}}          # stable across requeues of this job
NNODES=${SLURM_NNODES:-1}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1 || echo localhost)
PYTHON=${PYTHON:-.venv/bin/python}
[ -n "${DRY_RUN:-}" ] || bash scripts/setup.sh

launch() {  # launch STAGE_DIR OVERRIDES...
  local dir=$1; shift
  local cmd=(srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run --nnodes "$NNODES"
    --nproc_per_node "$GPUS" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500"
    --rdzv_id "${SLURM_JOB_ID:-0}" -m zeda_megatron.train "model=$MODEL" "model.hf_dir=$HF_DIR"
    "parallel=${PARALLEL:-reference_8gpu}" "hydra.run.dir=$dir" "$@" ${EXTRA:-})
  if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; return 0; fi
  "${cmd[@]}"
}

finished() {  # finished STAGE_DIR: the stage ran to its max_steps
  "$PYTHON" - "$1" <<'PY'
import json, sys, yaml, os
d = sys.argv[1]
try:
    s = json.load(open(os.path.join(d, "summary.json")))
    c = yaml.safe_load(open(os.path.join(d, "config.yaml")))
    sys.exit(0 if s["steps_done"] >= c["trainer"]["max_steps"] else 1)
except (OSError, KeyError, ValueError):
    sys.exit(1)
PY
}

requeue_unless_finished() {
  [ -n "${DRY_RUN:-}" ] && return 0
  if ! finished "$1"; then
    echo "[zeda] $1 stopped before max_steps (signal or time limit): requeueing ${SLURM_JOB_ID:-}"
    [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
}

finished "$RUN/sft" 2>/dev/null || { launch "$RUN/sft" stage=sft "data.path=$SFT_DATA" ${SFT_ARGS:-}; requeue_unless_finished "$RUN/sft"; }
finished "$RUN/opd" 2>/dev/null || { launch "$RUN/opd" stage=opd "data.path=$PROMPTS" \
  "model.init_checkpoint=$RUN/sft/checkpoints" ${OPD_ARGS:-}; requeue_unless_finished "$RUN/opd"; }
echo "[zeda] done: $RUN/opd/checkpoints; export with: python tools/export_hf.py --checkpoint ... --out ..."
