"""What a phase's log says first (what it will do) and last (what it did), the grace-period check after a
training stage, and the plan's listing (standard library only)."""

from __future__ import annotations

import os
import shlex
import sys
import time

from zeda_megatron.pipeline import state
from zeda_megatron.pipeline.launch import describe
from zeda_megatron.pipeline.phases import Phase
from zeda_megatron.training.metrics import read_metrics

GRACE_MARGIN_S = 60.0    # process exit and the requeue call, after the step in flight and the save


def say(msg: str, stream=None) -> None:
    print(msg, file=stream or sys.stdout, flush=True)


def stamp(msg: str) -> str:
    return f"[zeda {time.strftime('%H:%M:%S')}] {msg}"


def folder_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.path.getsize(os.path.join(root, fn))
            except OSError:
                pass
    return total


def latest_checkpoint(stage_dir: str) -> str | None:
    try:
        with open(os.path.join(stage_dir, "checkpoints", "latest")) as f:
            name = f.read().strip()
    except OSError:
        return None
    path = name if os.path.isabs(name) else os.path.join(stage_dir, "checkpoints", name)
    return path if os.path.isdir(path) else None


def grace_needed(ckpt_bytes: int, max_step_s: float, write_gbps: float) -> dict:
    """Seconds needed between the pre-time-limit signal and the kill: finish the step in flight, save
    the checkpoint (size / write speed), plus a fixed margin for process exit and the requeue call."""
    save_s = ckpt_bytes / (write_gbps * 1e9)
    return {"save_s": save_s, "step_s": max_step_s, "margin_s": GRACE_MARGIN_S,
            "total_s": max_step_s + save_s + GRACE_MARGIN_S}


def intro(phase: Phase) -> list[str]:
    """The head of a phase's log: what it will do, where a training stage resumes, its command."""
    lines = [f"==== phase {phase.index} {phase.name}: {phase.title} ({time.strftime('%Y-%m-%d %H:%M:%S')}) ===="]
    lines += [f"  {line}" for line in phase.intro]
    if phase.training:
        done = state.train_progress(phase)
        if done:
            lines.append(f"  resuming: {done}/{phase.max_steps} steps already done")
    if phase.cmd and phase.launcher != "call":
        lines.append("  $ python " + " ".join(shlex.quote(str(c)) for c in phase.cmd))
    return lines


def outro(phase: Phase, job: dict) -> list[str]:
    """What a phase did (the tail of its log); for a training stage also the grace period it needs."""
    if not phase.training:
        out = []
        for o in phase.outputs:
            if os.path.isdir(o):
                out.append(f"  did: {o} ({folder_size(o) / 1e6:.1f} MB)")
            elif os.path.isfile(o):
                out.append(f"  did: {o} ({os.path.getsize(o) / 1e6:.2f} MB)")
        for name in ("eval.json", "summary.json"):
            scores = state.read_json(os.path.join(phase.outputs[0], name)) if phase.outputs else None
            if scores:
                out.append("  scores: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                                                     if isinstance(v, (int, float)))[:600])
                break
        return out
    stage_dir = os.path.dirname(phase.status)
    last = (state.read_json(os.path.join(stage_dir, "summary.json")) or {}).get("last") or {}
    nan = float("nan")
    out = [f"  did: {state.train_progress(phase)}/{phase.max_steps} steps; final loss {last.get('loss', nan):.4f}, "
           f"kl {last.get('kl', nan):.4f}, null share {last.get('null_share', nan):.3f}, "
           f"expert FLOPs removed {last.get('expert_flops_removed', nan):.1%}"]
    ck = latest_checkpoint(stage_dir)
    if ck:
        size = folder_size(ck)
        steps = [r.get("step_time_s", 0.0) for r in read_metrics(stage_dir)]
        gbps, have = float(job.get("ckpt_write_gbps", 1.0)), float(job.get("grace_s", 900))
        g = grace_needed(size, max(steps or [0.0]), gbps)
        out.append(f"  checkpoint {ck}: {size / 1e9:.2f} GB; longest step {g['step_s']:.0f} s -> grace needed ~"
                   f"{g['total_s']:.0f} s (step + save at {gbps} GB/s + {GRACE_MARGIN_S:.0f} s); job.grace_s={have:.0f}"
                   + ("" if have >= g["total_s"] else "  WARNING: too short; raise #SBATCH --signal=B:USR1@N and job.grace_s"))
    return out


def print_plan(plan: dict, dry_run: bool) -> None:
    say(f"[zeda] plan: {plan['model']} ({plan['family']}), {plan['nodes']} node(s) x {plan['nproc_per_node']} "
        f"processes; run folder {plan['run_dir']}; W&B group {plan['wandb_group']}")
    check = plan["check"]
    for d in [check, *plan["phases"]]:
        p = Phase.from_dict(d)
        skip = "" if d is check or p.name in plan["wanted"] else "  (not in job.phases: skipped)"
        say(f"[zeda]  {p.index}. {p.name:9s} {p.title}{skip}")
        for line in p.intro:
            say(f"[zeda]       {line}")
        if dry_run and p.cmd:
            say(f"[zeda]       $ {describe(p)} python {' '.join(shlex.quote(c) for c in p.cmd)}")
    for n in plan["notes"]:
        say(f"[zeda] note: {n}")
