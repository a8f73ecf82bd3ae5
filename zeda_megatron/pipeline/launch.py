"""The command line that runs a phase: under Slurm one ``srun`` step (one torchrun per node with a c10d
rendezvous on the job's first node, or one process), on this machine torchrun or a plain process
(standard library only)."""

from __future__ import annotations

import shlex
import subprocess

from zeda_megatron.pipeline.phases import Phase

# torchrun forwards these to its ranks (a plain torchrun dies on SIGUSR1 and orphans its workers)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_MARGIN_S = 60    # of the grace period, what torchrun leaves for process exit and the requeue
MIN_SHUTDOWN_S = 30


def shutdown_timeout(grace_s: float) -> int:
    """How long torchrun waits for its ranks to save after forwarding a signal."""
    return int(grace_s - SHUTDOWN_MARGIN_S) if grace_s > SHUTDOWN_MARGIN_S + MIN_SHUTDOWN_S else MIN_SHUTDOWN_S


def first_node(nodelist: str) -> str | None:
    """The first host of a Slurm node list (``scontrol show hostnames``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else None


def one_task_per_node(nodes: int) -> list[str]:
    """srun's placement for one task per node (explicit: a step inherits the job's SLURM_NTASKS)."""
    return ["--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1"]


def torchrun(python: list[str], nnodes: int, nproc: int, grace_s: float) -> list[str]:
    return [*python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(shutdown_timeout(grace_s))]


def command(phase: Phase, *, python: str, host_python: str, port: int, grace_s: float, slurm: dict | None = None,
            nodes: int = 1) -> list[str]:
    """The full command line of ``phase`` ([] when there is nothing to run).

    ``python``: the interpreter of the phases (may carry arguments); ``host_python``: the batch shell's;
    ``slurm``: ``{"job_id", "master_addr", "srun_args"}`` inside a Slurm job (None on this machine);
    ``nodes``: the allocation's node count (a phase with ``nodes=0`` uses all of them)."""
    py = shlex.split(python)
    if phase.launcher in ("none", "call"):
        return []
    if phase.launcher == "host":
        return [*shlex.split(host_python), *phase.cmd]
    n = phase.nodes or nodes
    if slurm is None:
        if phase.launcher == "torchrun":
            return [*torchrun(py, 1, phase.nproc, grace_s), "--master-addr", "127.0.0.1", "--master-port", str(port),
                    *phase.cmd]
        return [*py, *phase.cmd]
    srun = ["srun", *shlex.split(slurm.get("srun_args") or "")]
    if phase.launcher == "torchrun":
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{slurm['master_addr']}:{port}",
                "--rdzv-id", f"{slurm['job_id']}-{phase.name}"]
        return [*srun, "--kill-on-bad-exit=1", *one_task_per_node(n), *torchrun(py, n, phase.nproc, grace_s), *rdzv,
                *phase.cmd]
    if phase.launcher == "every-node":
        return [*srun, *one_task_per_node(n), *py, *phase.cmd]
    return [*srun, "--nodes", "1", "--ntasks", "1", *py, *phase.cmd]


def describe(phase: Phase) -> str:
    """How a phase is launched, in a few words (the dry run's listing)."""
    return {"torchrun": f"srun torchrun x{phase.nproc}/node", "single": "srun (1 task)",
            "every-node": "srun (1 task per node)", "host": "batch shell"}.get(phase.launcher, "")
