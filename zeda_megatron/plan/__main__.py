"""``python -m zeda_megatron.plan <the train command's overrides> [gpu_gb=80] [world=8]``

Same Hydra config tree as ``zeda_megatron.train`` (conf/config.yaml); any override works. Parameter
counts come from the HF config's shapes (``model.hf_config``, or ``model.hf_dir/config.json``; no
weights are read); the layout from ``parallel.*`` (world size: ``world=``, else ``parallel.gpus``, else
the smallest world the layout needs). Prints a table and the headroom on a GPU of ``gpu_gb`` GB
(default: ``parallel.gpu_memory_gb``, else 80), then one JSON line with ``total_params``,
``student_params``, ``per_gpu_bytes`` (by part), ``gpu_bytes`` (the peak) and ``fits``. The plan is for
the GPU run the config describes, also when printed on a CPU machine. Exit status 2 on a config error.
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
    for a in argv:
        if a.startswith("gpu_gb="):
            gpu_gb = float(a.split("=", 1)[1])
        elif a.startswith("world="):
            world = int(a.split("=", 1)[1])
        else:
            overrides.append(a)
    try:
        cfg = compose(overrides, run_dir=".")
        spec = resolve(cfg, world, inputs=False, on_gpu=True, gpu_gb=gpu_gb)
        if spec.layout.gpu_memory_bytes is None:
            spec = resolve(cfg, world, inputs=False, on_gpu=True, gpu_gb=DEFAULT_GPU_GB)
        plan = plan_with_fixes(spec)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(plan, spec.model.name))
    print(json_line(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
