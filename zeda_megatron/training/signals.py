"""SIGTERM / SIGUSR1 -> "save a checkpoint and exit cleanly" (Slurm preemption and requeue), and the one
decision whether a Slurm job that stopped on a signal requeues itself.

The handler only sets a flag; the training loop polls it once per step, after the optimizer step:

    install_signal_handlers()
    for step in ...:
        train_step(...)
        if stop_requested_all():      # agreed by every rank (all-reduce MAX of the signal number)
            save_checkpoint(...); break

The pre-time-limit signal asks for a save and a requeue: SIGUSR1 for the batch job (slurm/adapt.sh:
``#SBATCH --signal=B:USR1@900``; the batch shell forwards it to every task of the running step, torchrun
to every rank) and submitit's signal for sweep points (conf/sweep/slurm.yaml; submitit asks Slurm for
``--signal=USR2@N`` unless SUBMITIT_PREEMPT_SIGNAL names another). SIGTERM (cancel, preemption, the time
limit itself) saves too, but never requeues. :func:`requeue_decision` is where that is decided, for the
batch job (``python3 -m zeda_megatron.pipeline next``, after a phase ended) and for sweep points
(:func:`requeue_if_stopped`); :func:`requeue_job` is the one ``scontrol requeue``. Ranks may see the signal
at different steps, hence :func:`stop_requested_all`, which every rank must call at the same point of
every step.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# submitit's own default for its pre-time-limit signal (submitit.slurm.slurm.SlurmJobEnvironment.USR_SIG)
SUBMITIT_DEFAULT_SIGNAL = "USR2"
DEFAULT_MAX_REQUEUES = 50


def submitit_signal() -> signal.Signals | None:
    """The pre-time-limit signal of a submitit Slurm job (None outside one)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", SUBMITIT_DEFAULT_SIGNAL).upper()
    return getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)


def requeue_signals() -> tuple[str, ...]:
    """Names of the signals that mean "the time limit is near: save and requeue"."""
    sub = submitit_signal()
    return ("SIGUSR1",) + ((sub.name,) if sub is not None and sub.name != "SIGUSR1" else ())


def requeue_decision(signal_name: str | None, restarts: int, limit: int) -> tuple[bool, str]:
    """Whether a Slurm job whose work stopped on ``signal_name`` requeues itself, and why (one line).

    Only the pre-time-limit signal requeues (:func:`requeue_signals`); SIGTERM means a cancel, a
    preemption or the time limit itself, and the job ends. ``restarts`` is SLURM_RESTART_COUNT; at
    ``limit`` requeues the job gives up (a phase that never gets through would loop forever)."""
    if not signal_name:
        return False, "no stop signal: nothing to requeue"
    if signal_name not in requeue_signals():
        return False, f"stopped on {signal_name} (cancel, preemption or the time limit): no requeue"
    if restarts >= limit:
        return False, f"stopped on {signal_name} after {restarts} requeues (limit {limit}): giving up"
    return True, f"stopped on {signal_name} (the time limit is near): requeue (restart {restarts + 1})"


def slurm_job_id(env=None) -> str | None:
    """This job's id for scontrol: ``<array job>_<task>`` in a job array (sweep points are one array; the
    array's own id would requeue every point), else SLURM_JOB_ID."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True if Slurm took it. Slurm answers with SIGTERM to every process
    of the job, this one included: it is ignored here (the caller's work is saved already)."""
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGUSR1, submitit_signal()):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    return subprocess.run(["scontrol", "requeue", str(job_id)]).returncode == 0


_state = {"signal": None, "agreed": None, "previous": {}}


def _handler(signum, frame):
    if _state["signal"] is None:
        log.warning("received %s: will save a checkpoint and exit after this step", signal.Signals(signum).name)
    _state["signal"] = signum


def install_signal_handlers(signals=None) -> None:
    """Install the flag-setting handler (main thread only; idempotent) for ``signals`` (default: SIGTERM,
    SIGUSR1 and, in a submitit Slurm job, submitit's pre-time-limit signal)."""
    if signals is None:
        signals = DEFAULT_SIGNALS + tuple(s for s in (submitit_signal(),) if s is not None and s not in DEFAULT_SIGNALS)
    for sig in signals:
        prev = signal.signal(sig, _handler)
        if prev is not _handler:
            _state["previous"][sig] = prev


def restore_signal_handlers() -> None:
    """Put back the handlers that were there before :func:`install_signal_handlers`."""
    for sig, prev in list(_state["previous"].items()):
        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    _state["previous"].clear()


def stop_requested() -> bool:
    """True once a handled signal arrived in this process."""
    return _state["signal"] is not None


def received_signal() -> int | None:
    """The signal number that requested the stop (None if none)."""
    return _state["signal"]


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Set the flag as if ``signum`` had arrived (tests, or a loop that wants to stop itself)."""
    _state["signal"] = signum


def reset() -> None:
    """Clear the flag (tests; a loop that goes on after handling it)."""
    _state["signal"] = None
    _state["agreed"] = None


def stop_signal_name() -> str | None:
    """Name of the signal the stop was agreed on (:func:`stop_requested_all`; this process's own before
    any agreement), e.g. "SIGUSR1"; None without a stop."""
    num = _state["agreed"] or _state["signal"]
    return signal.Signals(num).name if num else None


def stop_requested_all(group=None) -> bool:
    """:func:`stop_requested` agreed across the ranks of ``group``; every rank must call it at the same
    point. The ranks agree on the highest signal number any of them got (SIGTERM over the pre-time-limit
    signals: a cancel is not undone by a requeue); :func:`stop_signal_name` reports it. Without an
    initialised process group, the local flag."""
    import torch
    import torch.distributed as dist

    from zeda_megatron.distributed import all_reduce_host

    local = received_signal() or 0
    if dist.is_available() and dist.is_initialized():
        num = torch.tensor([local], dtype=torch.int32)
        local = int(all_reduce_host(num, op=dist.ReduceOp.MAX, group=group).item())
    if local:
        _state["agreed"] = local
    return bool(local)


# ---- Slurm sweep points (hydra-submitit-launcher: one job per point, one task per rank) ------------------
def export_slurm_rank_env() -> bool:
    """In a submitit Slurm job with several tasks (conf/sweep/slurm.yaml), give each task the torch
    distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from Slurm's, as
    torchrun would. Does nothing under torchrun (RANK set) or outside a submitit job; True if it set them."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def requeue_if_stopped(max_requeues: int | None = None) -> bool:
    """After a run that stopped on a signal inside a Slurm job started by submitit: requeue the job when
    :func:`requeue_decision` says so (global rank 0; the requeued point resumes from its checkpoint in the
    same folder) and end the process without a result, as submitit's own handler does
    (``SystemExit(-1)``), so that the sweep launcher waits for the requeued run's result. False where
    nothing was requeued. ``max_requeues``: cluster.max_requeues (default 50)."""
    if not stop_requested() or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if os.environ.get("SLURM_PROCID", "0") != "0" or not os.environ.get("SLURM_JOB_ID"):
        return False
    job = slurm_job_id()
    limit = DEFAULT_MAX_REQUEUES if max_requeues is None else int(max_requeues)
    requeue, why = requeue_decision(stop_signal_name(), int(os.environ.get("SLURM_RESTART_COUNT", "0")), limit)
    log.warning("Slurm job %s %s", job, why)
    if not requeue:
        return False
    if not requeue_job(job):
        log.warning("scontrol requeue failed: the point stays incomplete (resubmit to resume)")
        return False
    raise SystemExit(-1)
