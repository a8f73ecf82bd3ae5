"""The Slurm job's rehearse phase: both stages' training configs, exactly as the job will launch them,
rehearsed on this node's CPU with fake tensors (zeda_megatron.rehearse, docs/rehearsal.md) before the
first GPU hour is spent on converting, generating or training.

    python -m zeda_megatron.pipeline rehearse --out RUN/job/rehearsal.json --world 8 --gpu h100 \\
        -- SFT_OVERRIDES -- OPD_OVERRIDES

Prints each stage's per-rank ``part | planned | measured | ratio`` table, writes every stage's report to
``--out`` and exits 0 when every rank of both stages fits the GPU, 1 naming the stage, the rank and the
part that does not (or that failed to build; stage 2 is not rehearsed when stage 1 fails), 2 on a config
error (both stages' configs are resolved before anything is built). The phase is keyed on both stages'
overrides, so a requeued job does not rehearse again; changing a stage's settings does.
"""

from __future__ import annotations

import os
import time

from zeda_megatron.pipeline import state
from zeda_megatron.pipeline.report import say

STAGE_NUMBER = {"sft": 1, "opd": 2}


def split_stages(args: list[str]) -> dict[str, list[str]]:
    """``SFT_OVERRIDES -- OPD_OVERRIDES`` (the leading ``--`` already removed) -> {"sft": [...], "opd": [...]}."""
    if args.count("--") != 1:
        raise ValueError("rehearse: give the two stages' overrides as: -- SFT_OVERRIDES -- OPD_OVERRIDES")
    i = args.index("--")
    return {"sft": args[:i], "opd": args[i + 1:]}


def rehearse_stages(stages: dict[str, list[str]], world: int, gpu: str, out: str,
                    sampler_steps: int | None = None) -> int:
    # The rehearsal describes the GPU run from the CPU: on a GPU node, megatron-core must still take its
    # CPU paths (local modules, no Transformer Engine), as on the machine the rehearsal was measured on.
    os.environ["ZEDA_FORCE_CPU"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from zeda_megatron.plan.devices import device
    from zeda_megatron.plan.memory import PlanError
    from zeda_megatron.rehearse import rehearse
    from zeda_megatron.rehearse.report import format_rank
    from zeda_megatron.spec import ConfigError, resolve
    from zeda_megatron.spec.compose import compose

    try:
        dev = device(gpu)
    except ValueError as e:
        say(f"[rehearse] error: job.{e}")
        return 2
    t0 = time.time()
    specs = {}
    for name, ovs in stages.items():
        try:   # the checkpoint a stage starts from is written by an earlier phase: shapes need none
            specs[name] = resolve(compose([*ovs, "model.init_checkpoint=null"]), world, inputs=False, on_gpu=True,
                                  gpu_gb=dev.memory_gb)
        except (ConfigError, PlanError, ValueError) as e:
            say(f"[rehearse] error: stage {STAGE_NUMBER[name]} ({name}): {e}")
            return 2
    reports, failures = {}, []
    for name, spec in specs.items():
        lay = spec.layout
        say(f"[rehearse] stage {STAGE_NUMBER[name]} ({name}): {spec.model.name} on {world} x {dev.name}, "
            f"TP{lay.tp} PP{lay.pp} EP{lay.ep} DP{lay.dp}, micro batch {spec.trainer.micro_batch_size} x "
            f"{spec.trainer.seq_length} tokens; worst case: every routed slot on a real expert")
        rep = rehearse(spec, sampler_steps=sampler_steps)
        reports[name] = rep
        for row in rep["ranks"]:
            say("\n".join("  " + line for line in format_rank(row).splitlines()))
        failures += [f"stage {STAGE_NUMBER[name]} ({name}): {f}" for f in rep["failures"]]
        if not rep["ranks"]:
            failures.append(f"stage {STAGE_NUMBER[name]} ({name}): no rank was rehearsed")
        if failures:   # fix this stage first: the next one's rehearsal would be time spent for nothing
            break
    fits = not failures
    state.write_json(out, {"fits": fits, "gpu": gpu, "world": world, "failures": failures,
                           "stages": reports, "wall_s": time.time() - t0})
    for f in failures:
        say(f"[rehearse] {f}")
    if not fits:
        say("[rehearse] the job would not fit the GPUs at these settings: lower the stage's "
            "<stage>.trainer.micro_batch_size or trainer.seq_length, keep trainer.recompute=full and "
            "optim.optimizer_cpu_offload=true, or use more GPUs (docs/rehearsal.md)")
        return 1
    say(f"[rehearse] both stages fit {dev.name} on every rank role ({time.time() - t0:.0f} s); "
        f"report: {out}")
    return 0
