#!/bin/bash
# Shared body of slurm/adapt_{glm,qwen}.sh (FAMILY=glm|qwen): one job, every phase, resumable.
#   check -> convert (inject null experts) -> generate (stage-1 responses) -> prepare -> sft (stage 1)
#   -> opd (stage 2, from stage 1) -> export (HF folder) -> evaluate
# Arguments are Hydra overrides (routing: slurm/job.py's docstring). Each phase logs to RUN/logs/N-phase.log,
# is skipped when its output is complete, and a failed phase ends the job non-zero, naming it.
#
# Requeue: #SBATCH --signal=B:USR1@N sends SIGUSR1 to this shell N s before the time limit. The trap
# forwards it to every task of the running step (scancel --signal=USR1 <job>: torchrun and every rank;
# torchrun also forwards what it gets, --signals-to-handle ...,SIGUSR1); the trainer finishes its step,
# saves a checkpoint and exits; this shell then requeues the job (scontrol requeue) and exits 0. The
# requeued job (same job id, same run folder) skips completed phases and resumes the interrupted one.
# SIGTERM (scancel, preemption, the time limit itself) reaches every process directly; the trainer
# saves if it can and the job ends without requeueing itself.
# No `set -e`: every phase's exit status is handled explicitly (a trapped signal must not end the shell).
set -uo pipefail
FAMILY=${FAMILY:?FAMILY=glm|qwen (use slurm/adapt_glm.sh or slurm/adapt_qwen.sh)}

# ---- where things are ---------------------------------------------------------------------------------
if [ -z "${ZEDA_HOME:-}" ]; then   # the repository: Slurm runs a copy of the batch script from its spool
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    ZEDA_HOME=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
    ZEDA_HOME=$(cd "$(dirname "${ZEDA_HOME:-.}")/.." 2>/dev/null && pwd)
    [ -f "$ZEDA_HOME/slurm/job.py" ] || ZEDA_HOME=${SLURM_SUBMIT_DIR:-$PWD}
  else
    ZEDA_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
fi
export ZEDA_HOME
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1          # relative paths in overrides are relative to here
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ZEDA_HOME/.venv/bin/python" ]; then PYTHON=$ZEDA_HOME/.venv/bin/python; else PYTHON=python3; fi
fi
# slurm/job.py's light commands (state, intro, outro, mark, the inputs check) need only the standard
# library: they run in this shell with the node's python3; the plan and the phases run with PYTHON
# (inside the container when SRUN_ARGS names one).
HOST_PYTHON=${HOST_PYTHON:-$(command -v python3 || echo "$PYTHON")}
JOB=(${HOST_PYTHON} "$ZEDA_HOME/slurm/job.py")
PLAN=(${PYTHON} "$ZEDA_HOME/slurm/job.py")
SRUN_ARGS=${SRUN_ARGS:-}                            # e.g. --container-image=... --container-mounts=...
ts() { date '+%H:%M:%S'; }
say() { echo "[zeda $(ts)] $*"; }
export PYTHONUNBUFFERED=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# job.<key> overrides the shell needs before the plan exists
jobopt() { local k=$1 d=$2 a; for a in "${ARGS[@]}"; do [[ $a == job.$k=* ]] && d=${a#*=}; done; echo "$d"; }
ARGS=("$@")
RUN_DEFAULT=runs/zeda-${FAMILY}-${SLURM_JOB_ID:-local}
RUN=$(jobopt run_dir "$RUN_DEFAULT")
DEVICE=$(jobopt device cuda)
GRACE_S=$(jobopt grace_s 900)
PROGRESS_EVERY=$(jobopt progress_every_s 300)
MAX_REQUEUES=$(jobopt max_requeues 50)

# ---- dry run: the plan with the reference's hyper-parameters, nothing run ------------------------------
if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then
  exec "${PLAN[@]}" plan --family "$FAMILY" --run-dir "$RUN" --dry-run -- "$@"
fi

# ---- signals -------------------------------------------------------------------------------------------
STOP=""            # USR1: save and requeue; TERM: save and end
CHILD=""           # pid of the running phase (srun or the local launcher)
on_usr1() {
  [ -n "$STOP" ] && return
  STOP=USR1
  say "SIGUSR1 (time limit near): the running phase saves and stops; then the job requeues"
  if [ -n "$CHILD" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$CHILD" 2>/dev/null
    else kill -USR1 "$CHILD" 2>/dev/null; fi
  fi
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

requeue() {  # requeue this job (Slurm) and end the shell cleanly
  local why=$1
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
      say "$why; already requeued ${SLURM_RESTART_COUNT} times (job.max_requeues=$MAX_REQUEUES): giving up"; exit 1
    fi
    say "$why: requeueing job $SLURM_JOB_ID (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))); it resumes in $RUN"
    trap '' TERM USR1       # the requeue signals this shell: it is done already
    scontrol requeue "$SLURM_JOB_ID" || { say "scontrol requeue failed: resubmit with job.run_dir=$RUN to resume"; exit 1; }
    exit 0
  fi
  say "$why: run the same command again to resume (run folder $RUN)"; exit 0
}

# ---- launching -----------------------------------------------------------------------------------------
NNODES=${SLURM_NNODES:-1}
if [ -n "${SLURM_JOB_ID:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1)
else
  MASTER_ADDR=127.0.0.1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
RDZV_BASE=$(jobopt rdzv_port $(( 20000 + (${SLURM_JOB_ID:-$$} % 2000) * 8 )))
SHUTDOWN_S=$(( GRACE_S > 90 ? GRACE_S - 60 : 30 ))   # torchrun waits this long for ranks to save

launch() {  # launch PHASE: run the phase's command the way its launcher says, in the background
  local name=$1 launcher nproc log
  eval "launcher=\$LAUNCH_$name nproc=\$NPROC_$name log=\$LOG_$name"
  eval "local cmd=(\"\${CMD_$name[@]}\")"
  local port=$(( RDZV_BASE + PHASE_INDEX ))
  local py=(${PYTHON})
  local full=()
  case $launcher in
    torchrun)
      local tr=("${py[@]}" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$nproc"
                --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_S")
      if [ -n "${SLURM_JOB_ID:-}" ]; then
        tr+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "$SLURM_JOB_ID-$name")
        # shellcheck disable=SC2086
        full=(srun $SRUN_ARGS --kill-on-bad-exit=1 --nodes "$NNODES" --ntasks-per-node 1 "${tr[@]}" "${cmd[@]}")
      else
        full=("${tr[@]}" --master-addr 127.0.0.1 --master-port "$port" "${cmd[@]}")
      fi ;;
    single)
      if [ -n "${SLURM_JOB_ID:-}" ]; then
        # shellcheck disable=SC2086
        full=(srun $SRUN_ARGS --nodes 1 --ntasks 1 "${py[@]}" "${cmd[@]}")
      else
        full=("${py[@]}" "${cmd[@]}")
      fi ;;
    *) full=(true) ;;
  esac
  "${full[@]}" >>"$log" 2>&1 </dev/null &
  CHILD=$!
}

wait_child() {  # wait for CHILD, repeating its last progress line every PROGRESS_EVERY s; sets RC
  local log=$1 last=$SECONDS
  SHOWN=""
  while kill -0 "$CHILD" 2>/dev/null; do
    sleep 1 & wait $! 2>/dev/null
    if (( SECONDS - last >= PROGRESS_EVERY )); then
      last=$SECONDS
      local line
      line=$(grep -E '^(step [0-9]+/|\[generate\]|\[eval|.*[0-9]+/[0-9]+.*(eta|ETA))' "$log" 2>/dev/null | tail -n1)
      if [[ $line =~ ([0-9]+)/([0-9]+)\ \(([0-9.]+)\ prompts/s\) ]]; then   # generation: add the ETA
        line+=$(awk -v d="${BASH_REMATCH[1]}" -v n="${BASH_REMATCH[2]}" -v r="${BASH_REMATCH[3]}" \
          'BEGIN { if (r > 0) { s = int((n - d) / r); printf " | eta %d:%02d:%02d", s / 3600, s % 3600 / 60, s % 60 } }')
      fi
      [ -n "$line" ] && [ "$line" != "$SHOWN" ] && say "  $CUR: $line"
      SHOWN=$line
    fi
  done
  wait "$CHILD"; RC=$?
  while [ $RC -gt 128 ] && kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; RC=$?; done
  CHILD=""
}

# ---- 0. check: environment on every node, inputs, the plan -----------------------------------------------
mkdir -p "$RUN/logs" "$RUN/job" || { echo "[zeda] error: cannot create the run folder $RUN" >&2; exit 1; }
CHECK_LOG=$RUN/logs/0-check.log
say "job ${SLURM_JOB_ID:-(no Slurm)} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}: run folder $RUN"
{
  echo "==== phase 0 check: environment and inputs ($(date '+%F %T')) ===="
  echo "  python: $PYTHON; repository: $ZEDA_HOME; nodes: $NNODES; device: $DEVICE"
} >>"$CHECK_LOG"
if ! command -v "${PYTHON%% *}" >/dev/null 2>&1; then
  say "phase 'check' failed: python '$PYTHON' not found. Build the environment on a login node (bash scripts/setup.sh)"
  say "or set PYTHON= to the interpreter of your container; see docs/slurm.md"; exit 2
fi
# the inputs first (seconds): a missing model.hf_dir or data.prompts ends the job before anything starts
if ! "${JOB[@]}" plan --family "$FAMILY" --run-dir "$RUN" --inputs-only -- "$@" >>"$CHECK_LOG" 2>"$RUN/job/plan.err"; then
  cat "$RUN/job/plan.err" >>"$CHECK_LOG"; sed 's/^/  /' "$RUN/job/plan.err" >&2
  say "phase 'check' failed: missing or wrong inputs (the overrides named above); log: $CHECK_LOG" >&2; exit 2
fi
ENV_ARGS=()
if [ "$DEVICE" != cpu ]; then ENV_ARGS+=(--need-cuda --gpus "$(jobopt nproc_per_node "${SLURM_GPUS_ON_NODE:-8}")"); fi
if [ -n "${SLURM_JOB_ID:-}" ] && [ "$NNODES" -gt 1 ]; then   # every node's environment
  # shellcheck disable=SC2086
  srun $SRUN_ARGS --nodes "$NNODES" --ntasks-per-node 1 "${PLAN[@]}" env "${ENV_ARGS[@]}" >>"$CHECK_LOG" 2>&1 </dev/null
  RC=$?
  if [ $RC -ne 0 ]; then
    grep -E '^\[check\]|^  |^how to' "$CHECK_LOG" | tail -n 20 | sed 's/^/  /' >&2
    say "phase 'check' failed (exit $RC): the environment is incomplete on some node; log: $CHECK_LOG" >&2; exit 2
  fi
fi
# this node's environment, then the plan: both stages' configs validated, one command per phase
PLAN_CMD=("${PLAN[@]}" plan --family "$FAMILY" --run-dir "$RUN" --env-check "${ENV_ARGS[@]}" -- "$@")
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # shellcheck disable=SC2086
  srun $SRUN_ARGS --nodes 1 --ntasks 1 "${PLAN_CMD[@]}" > >(tee -a "$CHECK_LOG") 2>"$RUN/job/plan.err" </dev/null
else
  "${PLAN_CMD[@]}" > >(tee -a "$CHECK_LOG") 2>"$RUN/job/plan.err" </dev/null
fi
RC=$?
cat "$RUN/job/plan.err" >>"$CHECK_LOG"
if [ $RC -ne 0 ]; then
  grep -E '^\[check\]|^  |^how to' "$RUN/job/plan.err" | sed 's/^/  /' >&2
  if [ $RC -eq 3 ]; then say "phase 'check' failed: the environment is incomplete (see above); log: $CHECK_LOG" >&2
  else say "phase 'check' failed (exit $RC): fix the overrides named above; log: $CHECK_LOG" >&2; fi
  exit 2
fi
# shellcheck disable=SC1091
source "$RUN/job/phases.sh"
echo "==== check done ($(date '+%F %T')) ====" >>"$CHECK_LOG"

# ---- the phases ------------------------------------------------------------------------------------------
PHASE_LIST=(convert generate prepare sft opd export evaluate)
PHASE_INDEX=0
for CUR in "${PHASE_LIST[@]}"; do
  PHASE_INDEX=$(( PHASE_INDEX + 1 ))
  [[ " ${WANTED[*]} " == *" $CUR "* ]] || { say "phase $PHASE_INDEX $CUR: not in job.phases, skipped"; continue; }
  [ -n "$STOP" ] && break
  eval "LOG=\$LOG_$CUR ATOMIC=\$ATOMIC_$CUR"
  if "${JOB[@]}" state "$RUN" "$CUR" >>"$LOG" 2>&1; then
    say "phase $PHASE_INDEX $CUR: complete already, skipped (log: $LOG)"; continue
  fi
  say "phase $PHASE_INDEX $CUR: started (log: $LOG)"
  "${JOB[@]}" intro "$RUN" "$CUR" >>"$LOG" 2>&1
  [ -n "$ATOMIC" ] && rm -rf "$ATOMIC.tmp"
  T0=$SECONDS
  LOG_START=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
  launch "$CUR"
  # a USR1 that arrived between the launch and CHILD=$! was not forwarded: forward it now
  if [ "$STOP" = USR1 ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$CHILD" 2>/dev/null
    else kill -USR1 "$CHILD" 2>/dev/null; fi
  fi
  wait_child "$LOG"
  if [ $RC -eq 0 ] && [ -n "$ATOMIC" ]; then
    if [ -d "$ATOMIC.tmp" ]; then rm -rf "$ATOMIC" && mv "$ATOMIC.tmp" "$ATOMIC"; else RC=1; echo "no $ATOMIC.tmp written" >>"$LOG"; fi
  fi
  TRAIN=""; { [ "$CUR" = sft ] || [ "$CUR" = opd ]; } && TRAIN=1
  # a training stage that reached max_steps is complete even if torchrun reported the signal (rc 1)
  if { [ $RC -eq 0 ] || [ -n "$TRAIN" ]; } && "${JOB[@]}" mark "$RUN" "$CUR" >>"$LOG" 2>&1; then
    "${JOB[@]}" outro "$RUN" "$CUR" >>"$LOG" 2>&1
    echo "==== $CUR done in $(( SECONDS - T0 )) s ($(date '+%F %T')) ====" >>"$LOG"
    say "phase $PHASE_INDEX $CUR: done in $(( SECONDS - T0 )) s"
    grep '^  did:\|^  scores:\|^  checkpoint' "$LOG" | tail -n 3 | sed "s/^/[zeda $(ts)]   /"
    continue
  fi
  # not complete
  [ -n "$TRAIN" ] && "${JOB[@]}" outro "$RUN" "$CUR" >>"$LOG" 2>&1
  if [ "$STOP" = USR1 ]; then
    echo "==== $CUR stopped on SIGUSR1 after $(( SECONDS - T0 )) s (exit $RC) ====" >>"$LOG"
    requeue "phase $CUR stopped on the pre-time-limit signal"
  fi
  if [ "$STOP" = TERM ]; then
    echo "==== $CUR stopped on SIGTERM (exit $RC) ====" >>"$LOG"
    say "phase $PHASE_INDEX $CUR stopped on SIGTERM (exit $RC); to continue, resubmit with job.run_dir=$RUN"; exit 143
  fi
  if [ -n "$TRAIN" ] && { [ $RC -eq 0 ] || tail -c +$(( LOG_START + 1 )) "$LOG" | grep -q "stopping after step .* on signal"; }; then
    # the ranks got the signal directly (scancel --signal=USR1 <job>), saved and stopped (torchrun, which
    # forwards the signal, exits non-zero: the trainer's own "stopping after step N on signal" line decides)
    requeue "phase $CUR stopped before its last step (a signal reached the ranks)"
  fi
  echo "==== $CUR FAILED (exit $RC) ====" >>"$LOG"
  say "phase $PHASE_INDEX $CUR FAILED (exit $RC); last lines of $LOG:"
  grep -v -E 'Warning|warnings.warn' "$LOG" | tail -n 25 | sed 's/^/    /'
  say "job failed in phase '$CUR'"
  exit $(( RC == 0 ? 1 : RC ))
done
if [ "$STOP" = USR1 ]; then requeue "stopping on the pre-time-limit signal"; fi
[ "$STOP" = TERM ] && exit 143
say "all phases complete: model $RUN/hf, evaluation $RUN/eval, logs $RUN/logs"
exit 0
