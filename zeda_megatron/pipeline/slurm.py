"""The Slurm job's runner: what slurm/adapt.sh asks between phases (standard library only; the batch shell
runs it with the node's python3 before the project's environment is known).

    init  --family F -- OVERRIDES   the job's settings and inputs (sub-second), this start's check steps
    next  RUN [--after PHASE --rc N] [--signal USR1|TERM]
                                    how PHASE ended (its exit code, outputs and status file) and what to do
                                    now: RUN/job/next.sh says VERDICT=run with the next phase's command line,
                                    or requeue, done, or exit with a code
    requeue RUN                     scontrol requeue this job (after the batch shell ignores SIGTERM)

The shell only launches, waits, forwards signals and acts on the verdict.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from zeda_megatron.pipeline import launch, report, state
from zeda_megatron.pipeline import overrides as ov
from zeda_megatron.pipeline.phases import Phase
from zeda_megatron.training import signals

PACKAGE = "zeda_megatron.pipeline"
CHECK = "check"
FAILED_TAIL_LINES = 25
CHECK_LINE_PREFIXES = ("[check]", "  ", "how to")


def say(msg: str) -> None:
    report.say(report.stamp(msg))


def warn(msg: str) -> None:
    report.say(report.stamp(msg), sys.stderr)


def checks_path(run_dir: str) -> str:
    return os.path.join(state.job_dir(run_dir), "checks.json")


def plan_path(run_dir: str) -> str:
    return os.path.join(state.job_dir(run_dir), "plan.json")


def check_steps(family: str, run_dir: str, overrides: list[str], job: dict, start: str) -> list[Phase]:
    """The check phase's steps after the inputs (which the batch shell checks itself, in ``init``): each
    runs on every start of the job (a requeued job may get other nodes). A further check (a memory
    rehearsal, a time plan) is one more entry here; a step after ``plan`` can read RUN/job/plan.json."""
    log = os.path.join(run_dir, "logs", f"0-{CHECK}.log")
    env_args = [] if str(job["device"]) == "cpu" else ["--need-cuda", "--gpus", str(job["nproc_per_node"])]
    many = int(job["nodes"]) > 1
    steps = [
        # every node's environment (one node: the plan's own process checks it, one interpreter start less)
        Phase("env", "python, torch, megatron-core (+ CUDA and Transformer Engine) on every node",
              ["-m", PACKAGE, "env", *env_args], launcher="every-node",
              advice="the environment is incomplete on some node (see above)") if many else None,
        Phase("plan", "this node's environment, then both stages' configs validated for the allocation",
              ["-m", PACKAGE, "plan", "--family", family, "--run-dir", run_dir, "--env-check", *env_args, "--",
               *overrides], launcher="single", outputs=[plan_path(run_dir)],
              advice="fix what is named above (the environment, or the overrides)"),
    ]
    steps = [s for s in steps if s is not None]
    for s in steps:
        s.group, s.index, s.log, s.identity = CHECK, 0, log, start
        s.key = f"{s.name}-{start}"
    return steps


def write_shell(path: str, **values) -> None:
    """Bash assignments (a list becomes an array)."""
    lines = []
    for k, v in values.items():
        if isinstance(v, (list, tuple)):
            lines.append(f"{k}=({' '.join(shlex.quote(str(x)) for x in v)})")
        else:
            lines.append(f"{k}={shlex.quote(str(v))}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def append_log(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


# ---- init -----------------------------------------------------------------------------------------------
def init(family: str, overrides: list[str], env: dict) -> int:
    """The job's start: settings, the inputs (sub-second, before anything is launched) and this start's
    check steps. Prints bash assignments (RUN, PROGRESS_EVERY) on stdout; messages go to stderr."""
    try:
        job = ov.settings(family, overrides, env)
        errors = ov.check_inputs(family, overrides)
    except ov.OverrideError as e:
        job, errors = None, [str(e)]
    run_dir = job["run_dir"] if job else os.path.abspath(os.path.join("runs", f"zeda-{family}-local"))
    log = os.path.join(run_dir, "logs", f"0-{CHECK}.log")
    try:
        os.makedirs(state.job_dir(run_dir), exist_ok=True)
        os.makedirs(os.path.dirname(log), exist_ok=True)
    except OSError as e:
        warn(f"error: cannot create the run folder {run_dir}: {e}")
        return 1
    nodes = env.get("SLURM_JOB_NODELIST") or os.uname().nodename
    warn(f"job {env.get('SLURM_JOB_ID') or '(no Slurm)'} restart {env.get('SLURM_RESTART_COUNT', 0)} on {nodes}: "
         f"run folder {run_dir}")
    append_log(log, [f"==== phase 0 {CHECK}: environment and inputs ({time.strftime('%Y-%m-%d %H:%M:%S')}) ====",
                     f"  python: {env.get('PYTHON', sys.executable)}; repository: {env.get('ZEDA_HOME', '')}; "
                     f"nodes: {job['nodes'] if job else '?'}; device: {job['device'] if job else '?'}"])
    if errors:
        append_log(log, [f"[check] error: {e}" for e in errors])
        for e in errors:
            report.say(f"  [check] error: {e}", sys.stderr)
        warn(f"phase '{CHECK}' failed: missing or wrong inputs (the overrides named above); log: {log}")
        return 2
    start = f"{env.get('SLURM_JOB_ID', 'local')}-{env.get('SLURM_RESTART_COUNT', 0)}-{time.time():.6f}"
    steps = check_steps(family, run_dir, overrides, job, start)
    state.write_json(checks_path(run_dir), {"job": job, "start": time.time(), "steps": [s.to_dict() for s in steps]})
    report.say(f"RUN={shlex.quote(run_dir)}\nPROGRESS_EVERY={job['progress_every_s']}")
    return 0


# ---- next -----------------------------------------------------------------------------------------------
def load(run_dir: str) -> tuple[dict, list[Phase], dict | None]:
    """(the check's record, every phase in order: the check's steps then the plan's, the plan)."""
    checks = state.read_json(checks_path(run_dir))
    if checks is None:
        raise SystemExit(f"[zeda] {checks_path(run_dir)} is missing: start the job with slurm/adapt_*.sh")
    phases = [Phase.from_dict(d) for d in checks["steps"]]
    plan = state.read_json(plan_path(run_dir))
    check_done = all(state.is_complete(p, run_dir) for p in phases)
    if plan and check_done:   # the plan of this start (written by its plan step)
        phases += [Phase.from_dict(d) for d in plan["phases"]]
    return checks, phases, plan if check_done else None


def restarts(env: dict) -> int:
    return int(env.get("SLURM_RESTART_COUNT") or 0)


def stop_verdict(run_dir: str, job: dict, signal_name: str, env: dict, what: str) -> dict:
    """The one decision after a stop signal (:func:`signals.requeue_decision`)."""
    requeue, why = signals.requeue_decision(signal_name, restarts(env), int(job["max_requeues"]))
    if requeue and env.get("SLURM_JOB_ID"):
        say(f"{what}: {why}")
        return {"VERDICT": "requeue"}
    if requeue:
        say(f"{what}: run the same command again to resume (run folder {run_dir})")
        return {"VERDICT": "exit", "EXIT": 0}
    say(f"{what}: {why}; to continue, resubmit with job.run_dir={run_dir}")
    return {"VERDICT": "exit", "EXIT": 143 if signal_name == "SIGTERM" else 1}


def failure_lines(phase: Phase, offset: int) -> list[str]:
    """What the failed attempt printed (from where it started in the log): the check's own lines for a
    check step, else the last lines without warnings."""
    try:
        with open(phase.log, errors="replace") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return []
    if phase.group == CHECK:
        return [line for line in lines if line.startswith(CHECK_LINE_PREFIXES)][-FAILED_TAIL_LINES:]
    return [line for line in lines if "Warning" not in line and "warnings.warn" not in line][-FAILED_TAIL_LINES:]


def ended(phase: Phase, phases: list[Phase], run_dir: str, job: dict, rc: int, signal_name: str | None,
          env: dict) -> dict | None:
    """Judge how ``phase`` ended; None to go on with the next phase, else the verdict."""
    out = state.finish(phase, run_dir, rc, signal_name)
    secs, when = out["seconds"], time.strftime("%Y-%m-%d %H:%M:%S")
    if out["state"] == state.COMPLETE:
        lines = report.outro(phase, job) if not phase.group else []
        if phase.group:
            rest = [p for p in phases if p.group == phase.group and not state.is_complete(p, run_dir)]
            if not rest:
                checks = state.read_json(checks_path(run_dir)) or {}
                append_log(phase.log, [f"==== {CHECK} done ({when}) ===="])
                say(f"phase 0 {CHECK}: done in {time.time() - checks.get('start', time.time()):.0f} s")
            if phase.name == "plan":
                report.print_plan(state.read_json(plan_path(run_dir)), dry_run=False)
        else:
            append_log(phase.log, [*lines, f"==== {phase.name} done in {secs:.0f} s ({when}) ===="])
            say(f"phase {phase.index} {phase.name}: done in {secs:.0f} s")
            for line in [x for x in lines if x.startswith(("  did:", "  scores:", "  checkpoint"))][-3:]:
                say(f"  {line.strip()}")
        if signal_name:   # the phase finished as the signal came: stop before the next one
            return stop_verdict(run_dir, job, signal_name, env, f"stopping after phase {phase.name} on {signal_name}")
        return None
    if phase.training:
        append_log(phase.log, report.outro(phase, job))
    if out["state"] == state.STOPPED:
        sig = out["signal"]
        append_log(phase.log, [f"==== {phase.name} stopped on {sig} after {secs:.0f} s (exit {rc}) ===="])
        return stop_verdict(run_dir, job, sig, env, f"phase {phase.index} {phase.name} stopped on {sig}"
                            + (f" at step {out['step']}/{out['max_steps']}" if phase.training else ""))
    append_log(phase.log, [f"==== {phase.name} FAILED (exit {rc}){': ' + out['note'] if out['note'] else ''} ===="])
    if phase.group == CHECK:
        for line in failure_lines(phase, out["log_offset"]):
            report.say(f"  {line}", sys.stderr)
        warn(f"phase '{CHECK}' failed in step '{phase.name}' (exit {rc}): {phase.advice}; log: {phase.log}")
        return {"VERDICT": "exit", "EXIT": 2}
    say(f"phase {phase.index} {phase.name} FAILED (exit {rc}){': ' + out['note'] if out['note'] else ''}; "
        f"last lines of {phase.log}:")
    for line in failure_lines(phase, out["log_offset"]):
        report.say(f"    {line}")
    say(f"job failed in phase '{phase.name}'")
    return {"VERDICT": "exit", "EXIT": rc if rc else 1}


def start(phase: Phase, run_dir: str, job: dict, env: dict) -> dict:
    """Begin ``phase``: its log's head, the state cleared, its command line."""
    if not phase.group and state.stale(phase, run_dir):
        say(f"phase {phase.index} {phase.name}: its command changed since it completed: running it again")
    if phase.group:
        append_log(phase.log, [f"---- {phase.group} step {phase.name}: {phase.title} ----"])
    else:
        append_log(phase.log, report.intro(phase))
        say(f"phase {phase.index} {phase.name}: started (log: {phase.log})")
    state.begin(phase, run_dir)
    slurm = None
    if env.get("SLURM_JOB_ID"):
        slurm = {"job_id": env["SLURM_JOB_ID"], "srun_args": env.get("SRUN_ARGS", ""),
                 "master_addr": launch.first_node(env.get("SLURM_JOB_NODELIST", "")) or "127.0.0.1"}
    cmd = launch.command(phase, python=env.get("PYTHON") or sys.executable,
                         host_python=env.get("HOST_PYTHON") or sys.executable,
                         port=int(job["rdzv_port"]) + phase.index, grace_s=float(job["grace_s"]), slurm=slurm,
                         nodes=int(job["nodes"]))
    return {"VERDICT": "run", "PHASE": phase.name, "LOG": phase.log, "CMD": cmd or ["true"]}


def next_phase(run_dir: str, after: str | None, rc: int, signal_name: str | None, env: dict) -> dict:
    checks, phases, plan = load(run_dir)
    job = (plan or checks)["job"]
    if after:
        phase = next((p for p in phases if p.name == after), None)
        if phase is None:
            raise SystemExit(f"[zeda] phase {after!r} is not in the plan of {run_dir}")
        verdict = ended(phase, phases, run_dir, job, rc, signal_name, env)
        if verdict is not None:
            return verdict
        checks, phases, plan = load(run_dir)   # the plan step has just written the plan
        job = (plan or checks)["job"]
        names = [p.name for p in phases]
        todo = phases[names.index(after) + 1:]
    else:
        todo = phases
        if signal_name:
            return stop_verdict(run_dir, job, signal_name, env, f"stopping before the first phase on {signal_name}")
    wanted = plan["wanted"] if plan else []
    for p in todo:
        if not p.group and p.name not in wanted:
            say(f"phase {p.index} {p.name}: not in job.phases, skipped")
            continue
        if state.is_complete(p, run_dir):
            if not p.group:
                say(f"phase {p.index} {p.name}: complete already, skipped (log: {p.log})")
            continue
        return start(p, run_dir, job, env)
    say(f"all phases complete: model {os.path.join(run_dir, 'hf')}, evaluation {os.path.join(run_dir, 'eval')}, "
        f"logs {os.path.join(run_dir, 'logs')}")
    return {"VERDICT": "done", "EXIT": 0}


def next_command(run_dir: str, after: str | None, rc: int, signal: str | None, env: dict) -> int:
    name = None
    if signal:
        name = signal.upper() if signal.upper().startswith("SIG") else "SIG" + signal.upper()
    verdict = next_phase(os.path.abspath(run_dir), after, rc, name, env)
    write_shell(os.path.join(state.job_dir(os.path.abspath(run_dir)), "next.sh"), **{"EXIT": 0, **verdict})
    return 0


def requeue(run_dir: str, env: dict) -> int:
    job_id = signals.slurm_job_id(env)
    say(f"requeueing job {job_id} (restart {restarts(env) + 1}); it resumes in {run_dir}")
    if not signals.requeue_job(job_id):
        say(f"scontrol requeue failed: resubmit with job.run_dir={run_dir} to resume")
        return 1
    return 0
