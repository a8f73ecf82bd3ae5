"""``python -m zeda_megatron.plan <the train command's overrides> [gpu_gb=80] [world=8] [gpu=h100|h200|a100]
[--time 2-00:00:00] [--lengths FILE.jsonl] [prompts=60000]``

Same Hydra config tree as ``zeda_megatron.train`` (conf/config.yaml); any override works. Parameter
counts come from the HF config's shapes (``model.hf_config``, or ``model.hf_dir/config.json``; no
weights are read); the layout from ``parallel.*`` (world size: ``world=``, else ``parallel.gpus``, else
the smallest world the layout needs). Prints a table and the headroom on a GPU of ``gpu_gb`` GB
(default: ``parallel.gpu_memory_gb``, else 80), then one JSON line with ``total_params``,
``student_params``, ``per_gpu_bytes`` (by part), ``gpu_bytes`` (the peak) and ``fits``. The plan is for
the GPU run the config describes, also when printed on a CPU machine. Exit status 2 on a config error.

``gpu=`` adds the time plan (zeda_megatron.plan.time; the GPU's memory is then the default ``gpu_gb``):
hours of every phase of the Slurm job at these settings (both stages resolved from the same overrides),
stage 2's sample and train seconds per step and decode tokens/s, and with ``--time`` the job runs and
requeues that limit needs; ``--lengths`` takes real responses (JSONL) instead of the stated long-tailed
distribution, ``prompts=`` the number of prompts (60,000). The JSON line then carries ``time_plan``
({phase: {"hours": ...}}) and ``time_summary``.
"""

from __future__ import annotations

import sys

DEFAULT_GPU_GB = 80.0


def normalise_long_options(argv: list[str]) -> list[str]:
    """``--time X`` / ``--time=X`` (and ``--lengths``) as ``time=X``, the form the other options take."""
    out, args = [], iter(argv)
    for a in args:
        if a in ("--time", "--lengths"):
            a = f"{a}={next(args, '')}"
        out.append(a[2:] if a.startswith(("--time=", "--lengths=")) else a)
    return out


def main(argv=None) -> int:
    from zeda_megatron.plan.fixes import plan_with_fixes
    from zeda_megatron.plan.memory import PlanError
    from zeda_megatron.plan.report import format_table, json_line
    from zeda_megatron.spec import ConfigError, compose_command, resolve

    argv = normalise_long_options(list(sys.argv[1:] if argv is None else argv))
    options = {"gpu_gb": float, "world": int, "gpu": str, "time": str, "lengths": str, "prompts": int}
    try:
        parsed = compose_command(argv, options, __doc__)
        if parsed is None:
            return 0
        opts, cfg = parsed
        if opts["gpu"] is not None and opts["gpu_gb"] is None:
            from zeda_megatron.plan.devices import device

            opts["gpu_gb"] = device(opts["gpu"]).memory_gb
        spec = resolve(cfg, opts["world"], inputs=False, on_gpu=True, gpu_gb=opts["gpu_gb"])
        if spec.layout.gpu_memory_bytes is None:
            spec = resolve(cfg, opts["world"], inputs=False, on_gpu=True, gpu_gb=DEFAULT_GPU_GB)
        plan = plan_with_fixes(spec)
        text = None
        if opts["gpu"] is not None:
            from zeda_megatron.plan.time import REFERENCE_PROMPTS, time_plan_for

            overrides = [a for a in argv if a.partition("=")[0] not in options]
            text, times = time_plan_for(overrides, opts["gpu"], lengths_path=opts["lengths"], time_limit=opts["time"],
                                        world=opts["world"], n_prompts=opts["prompts"] or REFERENCE_PROMPTS)
            plan.update(times)
    except (ConfigError, PlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(plan, spec.model.name))
    if text:
        print("\n" + text)
    print(json_line(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
