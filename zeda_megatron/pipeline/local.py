"""Run a list of phases on this machine, in order (``python -m zeda_megatron.demo``): a complete phase is
reused, an incomplete one runs (torchrun or a plain process with its output in RUN/logs/N-name.log, or an
in-process call) and is judged by the same completion rule as the Slurm job's phases."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

from zeda_megatron.pipeline import launch, state
from zeda_megatron.pipeline.phases import REPO, Phase, assign_keys, fingerprint, register

PORT_TRIES = 3                  # a free port can be taken by another process before torchrun binds it
LOCAL_GRACE_S = 90.0            # torchrun's shutdown timeout on this machine: launch.MIN_SHUTDOWN_S
FAILED_TAIL_LINES = 40
ECHO_PREFIXES = ("step ", "[zeda]")   # the trainer's progress lines, repeated on the console


def run_command(phase: Phase, env: dict, say: Callable[[str], None]) -> tuple[int, str]:
    """Run a command phase; (exit code, its output). Its output is appended to the phase's log."""
    from zeda_megatron.distributed import free_port

    out = ""
    for attempt in range(PORT_TRIES):
        cmd = launch.command(phase, python=sys.executable, host_python=sys.executable, port=free_port(),
                             grace_s=LOCAL_GRACE_S)
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout
        with open(phase.log, "a") as f:
            f.write(out)
        if proc.returncode == 0 or "EADDRINUSE" not in out or attempt == PORT_TRIES - 1:
            break
        say(f"    port taken (EADDRINUSE), retrying {phase.name}")
    for line in out.splitlines():
        if line.startswith(ECHO_PREFIXES):
            print(f"  {line}", flush=True)
    return proc.returncode, out


def run_phases(phases: list[Phase], run_dir: str, *, env: dict, say: Callable[[str], None]) -> None:
    """Run ``phases`` in order in ``run_dir``; stops with SystemExit naming the phase and its log's tail
    when one fails. An in-process call that runs every time (``always``, e.g. a self-caching build) may
    return a value that identifies its result (the cache's content hash): it becomes part of the phase's
    fingerprint, so what reads its outputs reruns when it changes."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    producers: dict[str, str] = {}
    for n, p in enumerate(phases, start=1):
        p.index, p.log = n, p.log or os.path.join(run_dir, "logs", f"{n}-{p.name}.log")
        assign_keys([p], run_dir, producers)
        say(p.title)
        if state.is_complete(p, run_dir):
            say("    reused")
            continue
        state.begin(p, run_dir)
        if p.launcher == "call":
            result = p.call()
            rc, out = 0, ""
            if result is not None and p.always:
                p.key = fingerprint([p.key, result])
                register(p, producers)
        else:
            rc, out = run_command(p, env, say)
        ended = state.finish(p, run_dir, rc)
        if ended["state"] != state.COMPLETE:
            tail = "\n".join(out.splitlines()[-FAILED_TAIL_LINES:])
            raise SystemExit(f"[demo] {p.name} failed (exit {rc}{'; ' + ended['note'] if ended['note'] else ''}; "
                             f"full log: {p.log}):\n{tail}")
