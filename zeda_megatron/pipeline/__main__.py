"""The Slurm job's commands (slurm/adapt.sh calls them; not a user command):

    python3 -m zeda_megatron.pipeline init  --family glm -- OVERRIDES...   # batch shell, standard library only
    python3 -m zeda_megatron.pipeline next  RUN [--after PHASE --rc N] [--signal USR1|TERM]
    python3 -m zeda_megatron.pipeline requeue RUN
    python  -m zeda_megatron.pipeline env   [--need-cuda] [--gpus N]      # on each node (the project's python)
    python  -m zeda_megatron.pipeline plan  --family glm [--run-dir RUN] [--dry-run] [--env-check] -- OVERRIDES...
    python  -m zeda_megatron.pipeline rehearse --out FILE --world N --gpu h100 -- SFT_OVERRIDES -- OPD_OVERRIDES

``plan`` turns the job's Hydra overrides into one command per phase (zeda_megatron/pipeline/adapt.py),
checks the inputs and both stages' configs and writes RUN/job/plan.json; ``--dry-run`` prints it only.
``rehearse`` is the job's first work phase: both stages at full size on fake tensors
(zeda_megatron/pipeline/rehearsal.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from zeda_megatron.pipeline.overrides import FAMILY_MODEL, OverrideError
from zeda_megatron.pipeline.report import say


def plan_command(ns) -> int:
    from zeda_megatron.pipeline import adapt, report, state
    from zeda_megatron.pipeline.slurm import plan_path

    try:
        plan = adapt.build_plan(ns.family, ns.run_dir, ns.overrides, ns.dry_run, dict(os.environ))
    except OverrideError as e:
        say(f"[check] error: {e}", sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a Hydra composition error names the override
        say(f"[check] error: {type(e).__name__}: {e}", sys.stderr)
        return 2
    if plan["errors"] and not ns.dry_run:
        for e in plan["errors"]:
            say(f"[check] error: {e}", sys.stderr)
        return 2
    report.print_plan(plan, ns.dry_run)
    if not ns.dry_run:
        state.write_json(plan_path(plan["run_dir"]), plan)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        say(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    env = dict(os.environ)
    a = argparse.ArgumentParser(prog=f"python -m zeda_megatron.pipeline {cmd}")
    if cmd == "init":
        a.add_argument("--family", choices=sorted(FAMILY_MODEL), required=True)
        a.add_argument("overrides", nargs="*")
        ns = a.parse_args(rest)
        from zeda_megatron.pipeline.slurm import init

        return init(ns.family, ns.overrides, env)
    if cmd == "next":
        a.add_argument("run_dir")
        a.add_argument("--after", default=None)
        a.add_argument("--rc", type=int, default=0)
        a.add_argument("--signal", default="")
        ns = a.parse_args(rest)
        from zeda_megatron.pipeline.slurm import next_command

        return next_command(ns.run_dir, ns.after, ns.rc, ns.signal or None, env)
    if cmd == "requeue":
        a.add_argument("run_dir")
        ns = a.parse_args(rest)
        from zeda_megatron.pipeline.slurm import requeue

        return requeue(ns.run_dir, env)
    if cmd == "env":
        a.add_argument("--need-cuda", action="store_true")
        a.add_argument("--gpus", type=int, default=0)
        ns = a.parse_args(rest)
        from zeda_megatron.pipeline.envcheck import check_environment

        return check_environment(ns.need_cuda, ns.gpus)
    if cmd == "plan":
        a.add_argument("--family", choices=sorted(FAMILY_MODEL), required=True)
        a.add_argument("--run-dir", default=None)
        a.add_argument("--dry-run", action="store_true")
        a.add_argument("--env-check", action="store_true", help="check this node's environment first")
        a.add_argument("--need-cuda", action="store_true")
        a.add_argument("--gpus", type=int, default=0)
        a.add_argument("overrides", nargs="*")
        ns = a.parse_args(rest)
        if ns.env_check:
            from zeda_megatron.pipeline.envcheck import check_environment

            if check_environment(ns.need_cuda, ns.gpus) != 0:
                return 3
        return plan_command(ns)
    if cmd == "rehearse":
        a.add_argument("--out", required=True)
        a.add_argument("--world", type=int, required=True)
        a.add_argument("--gpu", default="h100")
        a.add_argument("--sampler-steps", type=int, default=None)
        if "--" not in rest:
            a.error("give the two stages' overrides as: -- SFT_OVERRIDES -- OPD_OVERRIDES")
        i = rest.index("--")
        ns = a.parse_args(rest[:i])
        from zeda_megatron.pipeline.rehearsal import rehearse_stages, split_stages

        try:
            stages = split_stages(rest[i + 1:])
        except ValueError as e:
            a.error(str(e))
        return rehearse_stages(stages, ns.world, ns.gpu.lower(), ns.out, ns.sampler_steps)
    say(f"unknown command {cmd!r}\n{__doc__}", sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
