"""``python -m zeda_megatron.rehearse <the train command's overrides> [null_share=target|0.5] [ranks=0,4]
[decode_steps=4] [sampler_steps=N] [gpu_gb=80]``

Rehearses the GPU run the overrides describe on this CPU machine (docs/rehearsal.md): each rank role
of the layout (first / last pipeline stage, the heaviest stage; ``ranks=`` to choose) in a process
of its own, the trainer's build on fake tensors and one step of the stage under an allocation
tracker. Prints per rank ``part | planned | measured | ratio`` (the plan: ``python -m
zeda_megatron.plan``, same overrides), then one JSON line ``{"ranks": [{"rank", "planned_bytes",
"measured_bytes", "planned_peak", "measured_peak", ...}], "fits", "wall_s", ...}``.

``null_share``: the share of routed slots assumed on null experts (default 0: the worst case, every
slot real; ``target``: the configured equilibrium share). ``sampler_steps``: stage 2's sampler stops
after that many forwards (default: every slot's prefill, then ``decode_steps`` decode steps). Exit status 0 when every rank fits, 1 when a
rank does not fit or fails (the line names the rank and the part), 2 on a config error.
"""

from __future__ import annotations

import sys

def main(argv=None) -> int:
    from zeda_megatron.plan.memory import PlanError
    from zeda_megatron.rehearse import rehearse
    from zeda_megatron.rehearse.rank import DECODE_STEPS
    from zeda_megatron.rehearse.report import format_rank, json_line
    from zeda_megatron.spec import ConfigError, compose_command, resolve

    options = {"null_share": str, "ranks": str, "decode_steps": int, "sampler_steps": int, "gpu_gb": float}
    try:
        parsed = compose_command(argv, options, __doc__)
        if parsed is None:
            return 0
        opts, cfg = parsed
        spec = resolve(cfg, None, inputs=False, on_gpu=True, gpu_gb=opts["gpu_gb"] or 80.0)
        share = opts["null_share"] or "0"
        null_share = spec.model.null.target_share if share == "target" else float(share)
        if not 0.0 <= null_share < 1.0:
            raise ConfigError(f"null_share={share}: target or a number in [0, 1)")
        ranks = [int(r) for r in opts["ranks"].split(",")] if opts["ranks"] else None
        if ranks is not None and any(not 0 <= r < spec.layout.world for r in ranks):
            raise ConfigError(f"ranks={opts['ranks']}: ranks of a world of {spec.layout.world}")
    except (ConfigError, PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = rehearse(spec, ranks, null_share=null_share, decode_steps=opts["decode_steps"] or DECODE_STEPS,
                      sampler_steps=opts["sampler_steps"])
    print(f"rehearsal: {spec.model.name} stage={spec.stage.name} world={spec.layout.world} tp={spec.layout.tp} "
          f"pp={spec.layout.pp} ep={spec.layout.ep} (null share assumed {null_share:.2f})")
    for row in report["ranks"]:
        print("\n" + format_rank(row))
    for f in report["failures"]:
        print(f"\n{f}")
    print(json_line(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
