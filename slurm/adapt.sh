#!/bin/bash
# Shared body of slurm/adapt_{glm,qwen}.sh (FAMILY=glm|qwen): one job, every phase, resumable.
#   check -> convert (inject null experts) -> generate (stage-1 responses) -> prepare -> sft (stage 1)
#   -> opd (stage 2, from stage 1) -> export (HF folder) -> evaluate
# Arguments are Hydra overrides (routing: zeda_megatron/pipeline/overrides.py). The phases are declared in
# Python (zeda_megatron/pipeline/adapt.py); this shell asks `python3 -m zeda_megatron.pipeline next` what
# to run next and how the last phase ended (its exit code, outputs and the status file its command
# writes), launches that command in the background, waits, and acts on the verdict: run the next phase,
# requeue, or exit. Each phase logs to RUN/logs/N-phase.log; docs/slurm.md describes the job.
#
# Requeue: #SBATCH --signal=B:USR1@N sends SIGUSR1 to this shell N s before the time limit. The trap
# forwards it to every task of the running step (scancel --signal=USR1 <job>: torchrun and every rank, on
# every node; torchrun also forwards what it gets); the trainer finishes its step, saves and exits; the
# verdict is then "requeue" (decided in zeda_megatron/training/signals.py) and this shell requeues the job.
# SIGTERM (scancel, preemption, the time limit itself) reaches every process directly; the trainer saves
# if it can and the job ends without requeueing itself.
# No `set -e`: every exit status is handled explicitly (a trapped signal must not end the shell).
set -uo pipefail
FAMILY=${FAMILY:?FAMILY=glm|qwen (use slurm/adapt_glm.sh or slurm/adapt_qwen.sh)}

# ---- where things are ---------------------------------------------------------------------------------
if [ -z "${ZEDA_HOME:-}" ]; then   # the repository: Slurm runs a copy of the batch script from its spool
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    ZEDA_HOME=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
    ZEDA_HOME=$(cd "$(dirname "${ZEDA_HOME:-.}")/.." 2>/dev/null && pwd)
    [ -d "$ZEDA_HOME/zeda_megatron/pipeline" ] || ZEDA_HOME=${SLURM_SUBMIT_DIR:-$PWD}
  else
    ZEDA_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
fi
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1          # relative paths in overrides are relative to here
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ZEDA_HOME/.venv/bin/python" ]; then PYTHON=$ZEDA_HOME/.venv/bin/python; else PYTHON=python3; fi
fi
# The bookkeeping (init, next, requeue) needs only the standard library: it runs in this shell with the
# node's python3. The check's environment step, the plan and the phases run with PYTHON, through srun
# (inside the container when SRUN_ARGS names one). Every process finds this repository's package first.
HOST_PYTHON=${HOST_PYTHON:-$(command -v python3 || echo "$PYTHON")}
SRUN_ARGS=${SRUN_ARGS:-}                            # e.g. --container-image=... --container-mounts=...
export ZEDA_HOME PYTHON HOST_PYTHON SRUN_ARGS PYTHONPATH="$ZEDA_HOME${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
PIPE=(${HOST_PYTHON} -m zeda_megatron.pipeline)
say() { echo "[zeda $(date '+%H:%M:%S')] $*"; }

# ---- dry run: the plan with the reference's hyper-parameters, nothing run ------------------------------
if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then
  exec ${PYTHON} -m zeda_megatron.pipeline plan --family "$FAMILY" --dry-run -- "$@"
fi

# ---- signals -------------------------------------------------------------------------------------------
STOP=""            # USR1: save and requeue; TERM: save and end
CHILD=""           # pid of the running phase (srun or the local launcher)
forward_usr1() {
  [ -n "$CHILD" ] || return 0
  if [ -n "${SLURM_JOB_ID:-}" ]; then scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$CHILD" 2>/dev/null
  else kill -USR1 "$CHILD" 2>/dev/null; fi
}
on_usr1() {
  [ -n "$STOP" ] && return
  STOP=USR1
  say "SIGUSR1 (time limit near): the running phase saves and stops; then the job requeues"
  forward_usr1
}
on_term() {
  [ "$STOP" = TERM ] && return
  STOP=TERM
  say "SIGTERM (cancel, preemption or the time limit): the running phase saves if it can; no requeue"
  # under Slurm the processes of the step got SIGTERM themselves; locally, pass it on
  [ -z "${SLURM_JOB_ID:-}" ] && [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
}
trap on_usr1 USR1
trap on_term TERM INT

wait_child() {  # wait for CHILD, repeating its last progress line every PROGRESS_EVERY s; sets RC
  local log=$1 last=$SECONDS shown="" line
  while kill -0 "$CHILD" 2>/dev/null; do
    sleep 1 & wait $! 2>/dev/null
    if (( SECONDS - last >= PROGRESS_EVERY )); then
      last=$SECONDS
      line=$(grep -E '^(step [0-9]+/|\[generate\]|\[eval|.*[0-9]+/[0-9]+.*(eta|ETA))' "$log" 2>/dev/null | tail -n1)
      if [[ $line =~ ([0-9]+)/([0-9]+)\ \(([0-9.]+)\ prompts/s\) ]]; then   # generation: add the ETA
        line+=$(awk -v d="${BASH_REMATCH[1]}" -v n="${BASH_REMATCH[2]}" -v r="${BASH_REMATCH[3]}" \
          'BEGIN { if (r > 0) { s = int((n - d) / r); printf " | eta %d:%02d:%02d", s / 3600, s % 3600 / 60, s % 60 } }')
      fi
      [ -n "$line" ] && [ "$line" != "$shown" ] && say "  $PHASE: $line"
      shown=$line
    fi
  done
  wait "$CHILD"; RC=$?
  while [ $RC -gt 128 ] && kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; RC=$?; done
  CHILD=""
}

# ---- the job: check the inputs here, then ask for each phase in turn ------------------------------------
JOBVARS=$("${PIPE[@]}" init --family "$FAMILY" -- "$@") || exit $?
eval "$JOBVARS"                                     # RUN, PROGRESS_EVERY
NEXT_ARGS=()
while :; do
  rm -f "$RUN/job/next.sh"
  "${PIPE[@]}" next "$RUN" "${NEXT_ARGS[@]}" --signal "$STOP" || { say "the job's bookkeeping failed (above)"; exit 1; }
  VERDICT="" EXIT=1 PHASE="" LOG="" CMD=()
  # shellcheck disable=SC1091
  source "$RUN/job/next.sh"
  case $VERDICT in
    run) ;;
    requeue) trap '' TERM USR1; "${PIPE[@]}" requeue "$RUN"; exit $? ;;
    *) exit "$EXIT" ;;
  esac
  "${CMD[@]}" >>"$LOG" 2>&1 </dev/null &
  CHILD=$!
  [ "$STOP" = USR1 ] && forward_usr1    # a USR1 that arrived before CHILD was set
  wait_child "$LOG"
  NEXT_ARGS=(--after "$PHASE" --rc "$RC")
done
