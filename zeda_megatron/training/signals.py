"""SIGTERM / SIGUSR1 -> "save a checkpoint and exit cleanly" (Slurm preemption and requeue).

The handler only sets a flag; the training loop polls it once per step, after the optimizer step:

    install_signal_handlers()
    for step in ...:
        train_step(...)
        if stop_requested_all():      # agreed by every rank (all-reduce MAX)
            save_checkpoint(...); break

Slurm (slurm/adapt.sh): ``#SBATCH --signal=B:USR1@900`` reaches the batch shell, whose trap forwards it to
every task of the running step (``scancel --signal=USR1 <job>``); torchrun runs with
``--signals-to-handle ...,SIGUSR1`` and a shutdown timeout as long as the save needs, so every rank gets
it; the ranks save and exit, and the shell requeues the job (``scontrol requeue``); the requeued job
resumes from the checkpoint (``trainer.resume=auto``). SIGTERM (cancel, preemption) reaches the ranks
directly and also saves. Ranks may see the signal at different steps, hence :func:`stop_requested_all`,
which every rank must call at the same point of every step. Sweep points launched by submitit
(conf/sweep/slurm.yaml) use :func:`export_slurm_rank_env` and :func:`requeue_if_stopped`.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_state = {"signal": None, "previous": {}}


def _handler(signum, frame):
    if _state["signal"] is None:
        log.warning("received %s: will save a checkpoint and exit after this step", signal.Signals(signum).name)
    _state["signal"] = signum


def install_signal_handlers(signals=DEFAULT_SIGNALS) -> None:
    """Install the flag-setting handler (main thread only; idempotent)."""
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


def stop_requested_all(group=None) -> bool:
    """:func:`stop_requested` agreed across the ranks of ``group`` (all-reduce MAX); every rank must
    call it at the same point. Without an initialised process group, the local flag."""
    import torch
    import torch.distributed as dist

    from zeda_megatron.distributed import all_reduce_host

    local = stop_requested()
    if not dist.is_available() or not dist.is_initialized():
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32)
    return bool(all_reduce_host(flag, op=dist.ReduceOp.MAX, group=group).item())


# ---- Slurm sweep points (hydra-submitit-launcher: one job per point, one task per rank) ------------------
def export_slurm_rank_env() -> bool:
    """In a submitit Slurm job with several tasks (conf/sweep/slurm.yaml), give each task the torch
    distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from Slurm's, as
    torchrun would. Does nothing under torchrun (RANK set) or outside a submitit job; True if it set them."""
    import os

    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def requeue_if_stopped() -> bool:
    """After a run that stopped on the pre-time-limit signal inside a Slurm job started by submitit:
    requeue the job (global rank 0; the requeued point resumes from its checkpoint in the same folder)
    and end the process without a result, as submitit's own handler does (``SystemExit(-1)``), so that
    the sweep launcher waits for the requeued run's result. slurm/adapt.sh does the same for the batch
    job. False where nothing was requeued."""
    import os
    import subprocess

    if not stop_requested() or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if os.environ.get("SLURM_PROCID", "0") != "0" or not os.environ.get("SLURM_JOB_ID"):
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    limit = int(os.environ.get("ZEDA_MAX_REQUEUES", "50"))
    if restarts >= limit:
        log.warning("stopped on a signal after %d requeues (ZEDA_MAX_REQUEUES=%d): not requeueing", restarts, limit)
        return False
    log.warning("stopped on a signal: requeueing Slurm job %s (restart %d)", os.environ["SLURM_JOB_ID"], restarts + 1)
    if subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]]).returncode != 0:
        log.warning("scontrol requeue failed: the point stays incomplete (resubmit to resume)")
        return False
    raise SystemExit(-1)
