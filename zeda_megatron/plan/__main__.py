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


def main(argv=None) -> int:
    from zeda_megatron.plan.fixes import plan_with_fixes
    from zeda_megatron.plan.memory import PlanError
    from zeda_megatron.plan.report import format_table, json_line
    from zeda_megatron.spec import ConfigError, compose, resolve

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    gpu_gb, world, overrides = None, None, []
    timing = {"gpu": None, "time": None, "lengths": None, "prompts": None}
    args = iter(argv)
    for a in args:
        if a in ("--time", "--lengths"):  # --time X / --lengths F
            a = f"{a[2:]}={next(args, '')}"
        a = a[2:] if a.startswith(("--time=", "--lengths=")) else a
        key = a.split("=", 1)[0]
        if key == "gpu_gb":
            gpu_gb = float(a.split("=", 1)[1])
        elif key == "world":
            world = int(a.split("=", 1)[1])
        elif key in timing:
            timing[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    try:
        if timing["gpu"] is not None and gpu_gb is None:
            from zeda_megatron.plan.devices import device

            gpu_gb = device(timing["gpu"]).memory_gb
        cfg = compose(overrides, run_dir=".")
        spec = resolve(cfg, world, inputs=False, on_gpu=True, gpu_gb=gpu_gb)
        if spec.layout.gpu_memory_bytes is None:
            spec = resolve(cfg, world, inputs=False, on_gpu=True, gpu_gb=DEFAULT_GPU_GB)
        plan = plan_with_fixes(spec)
        text = None
        if timing["gpu"] is not None:
            from zeda_megatron.plan.time import time_plan_for

            text, times = time_plan_for(overrides, timing["gpu"], lengths_path=timing["lengths"],
                                        time_limit=timing["time"], world=world,
                                        n_prompts=int(timing["prompts"] or 60000))
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
