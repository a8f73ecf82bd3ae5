"""Where a run stands: one completion rule for every phase, the status files, and how a phase ended
(standard library only: the batch shell runs this with the node's python3).

* ``RUN/job/<phase>.done``: written once a phase completed, holding its fingerprint. A phase is complete
  when its marker holds its current fingerprint, its outputs exist and, for a training stage, the status
  file its trainer wrote says it reached its last step.
* ``<stage run folder>/status.json``: written by the trainer when it ends (:func:`record_run_end`):
  ``{"state": "complete" | "stopped", "step": N, "max_steps": M, "signal": "SIGUSR1" | null}``.
* ``RUN/job/<phase>.status.json``: written by the runner for every phase when it starts and ends:
  ``{"state": "running" | "complete" | "stopped" | "failed", "rc": ..., "signal": ..., "seconds": ...}``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from zeda_megatron.pipeline.phases import Phase
from zeda_megatron.training.metrics import read_metrics

COMPLETE, STOPPED, FAILED, RUNNING = "complete", "stopped", "failed", "running"


def job_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "job")


def marker(run_dir: str, name: str) -> str:
    return os.path.join(job_dir(run_dir), f"{name}.done")


def phase_status_path(run_dir: str, name: str) -> str:
    return os.path.join(job_dir(run_dir), f"{name}.status.json")


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: str, obj: dict) -> None:
    """Written beside and renamed: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---- the trainer's side ------------------------------------------------------------------------------
def record_run_end(run_dir: str, steps_done: int, max_steps: int, signal: str | None) -> dict:
    """The trainer's status file (rank 0, after its last save): how the run ended."""
    state = COMPLETE if steps_done >= max_steps else STOPPED
    status = {"state": state, "step": int(steps_done), "max_steps": int(max_steps), "signal": signal,
              "time": time.time()}
    write_json(os.path.join(run_dir, "status.json"), status)
    return status


def train_progress(phase: Phase) -> int:
    """Steps a training stage has done (its trainer's status, else its summary, else its metrics)."""
    st = read_json(phase.status) if phase.status else None
    if st and "step" in st:
        return int(st["step"])
    run_dir = os.path.dirname(phase.status)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    if summary and "steps_done" in summary:
        return int(summary["steps_done"])
    return max((int(r.get("step", 0)) for r in read_metrics(run_dir)), default=0)


# ---- the completion rule ------------------------------------------------------------------------------
def outputs_done(phase: Phase) -> bool:
    """The phase's outputs are there (a training stage: its trainer said it reached its last step)."""
    if not all(os.path.exists(o) for o in phase.outputs):
        return False
    if phase.training:
        st = read_json(phase.status) or {}
        return st.get("state") == COMPLETE and int(st.get("step", 0)) >= phase.max_steps
    return True


def is_complete(phase: Phase, run_dir: str) -> bool:
    if phase.always:
        return False
    if phase.launcher == "none":   # nothing to run: the outputs are given
        return outputs_done(phase)
    m = read_json(marker(run_dir, phase.name))
    return bool(m) and m.get("key") == phase.key and outputs_done(phase)


def stale(phase: Phase, run_dir: str) -> bool:
    """Completed once, with another fingerprint (its settings or an upstream phase changed)."""
    m = read_json(marker(run_dir, phase.name))
    return bool(m) and m.get("key") != phase.key


def mark(phase: Phase, run_dir: str, **info) -> None:
    write_json(marker(run_dir, phase.name), {"key": phase.key, "time": time.time(), **info})


# ---- a phase's life ------------------------------------------------------------------------------------
def begin(phase: Phase, run_dir: str) -> None:
    """Before its command starts: clear what a previous attempt left that would mislead the verdict."""
    if phase.atomic:
        shutil.rmtree(phase.atomic + ".tmp", ignore_errors=True)
    if phase.status and os.path.exists(phase.status):
        os.remove(phase.status)
    offset = os.path.getsize(phase.log) if phase.log and os.path.isfile(phase.log) else 0
    write_json(phase_status_path(run_dir, phase.name), {"state": RUNNING, "start": time.time(), "log_offset": offset})


def finish(phase: Phase, run_dir: str, rc: int, stop_signal: str | None = None) -> dict:
    """How the phase ended, from its exit code, its outputs and its command's status file; marks it
    complete when it is, and writes RUN/job/<phase>.status.json. ``stop_signal``: a stop signal the
    runner itself received while the phase ran (the batch shell's trap).

    complete: the completion rule holds (a training stage that reached its last step is complete even if
    torchrun reported the signal it forwarded); stopped: a stop signal ended it early (the runner's, or
    the one its trainer recorded); failed: anything else."""
    begun = read_json(phase_status_path(run_dir, phase.name)) or {}
    started = begun.get("start", time.time())
    note = ""
    if rc == 0 and phase.atomic:
        tmp = phase.atomic + ".tmp"
        if os.path.isdir(tmp):
            shutil.rmtree(phase.atomic, ignore_errors=True)
            os.replace(tmp, phase.atomic)
        else:
            rc, note = 1, f"no {tmp} written"
    own = read_json(phase.status) if phase.status else None
    signal = stop_signal or ((own or {}).get("signal") if (own or {}).get("state") == STOPPED else None)
    if (rc == 0 or (own or {}).get("state") == COMPLETE) and outputs_done(phase):
        state = COMPLETE
        mark(phase, run_dir)
    elif signal:
        state = STOPPED
    else:
        state = FAILED
        if rc == 0 and not note:
            missing = [o for o in phase.outputs if not os.path.exists(o)]
            note = (f"ended at step {train_progress(phase)}/{phase.max_steps} without a stop signal" if phase.training
                    else "exited 0 but did not write " + ", ".join(missing))
    out = {"state": state, "rc": rc, "signal": signal, "start": started, "end": time.time(),
           "seconds": time.time() - started, "note": note, "log_offset": begun.get("log_offset", 0)}
    if phase.training:
        out["step"], out["max_steps"] = train_progress(phase), phase.max_steps
    write_json(phase_status_path(run_dir, phase.name), out)
    return out
