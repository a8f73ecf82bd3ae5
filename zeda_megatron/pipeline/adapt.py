"""The Slurm job's phases (slurm/adapt_{glm,qwen}.sh), from its Hydra overrides, with the reference's
hyper-parameters (docs/method.md sections 4-5) as defaults for the released models on one 8-GPU node:

    check -> convert (inject null experts) -> generate (stage-1 responses) -> prepare -> sft (stage 1)
    -> opd (stage 2, from stage 1) -> export (HF folder) -> evaluate

:func:`build_plan` composes both stages' configs (Hydra), validates them for the allocation and returns
the plan: one :class:`~zeda_megatron.pipeline.phases.Phase` per phase, written to RUN/job/plan.json by
the check phase (``python -m zeda_megatron.pipeline plan``). The overrides' routing is
:mod:`zeda_megatron.pipeline.overrides`.
"""

from __future__ import annotations

import math
import os
import time

from zeda_megatron.pipeline import overrides as ov
from zeda_megatron.pipeline.phases import REPO, Phase, assign_keys, export_phase, number, train_phase

# The reference release (docs/method.md sections 4-5), for the released models on one 8-GPU node.
REFERENCE = {
    "num_prompts": 60000,              # ZEDA-prompts-60k.jsonl (the count is read from data.prompts when given)
    "sft": {"epochs": 1, "global_batch_size": 128, "micro_batch_size": 1, "seq_length": 65536, "save_interval": 50},
    "opd": {"max_steps": 321, "samples_per_prompt": 2, "global_batch_size": 32, "micro_batch_size": 2,
            "max_new_tokens": 32768, "prompt_tokens": 4096, "temperature": 1.0, "save_interval": 20},
    # stage-1 responses: sampled from the original model; the reference does not state its settings
    "generate": {"max_new_tokens": 32768, "temperature": 1.0},
}
# the parts of the training config that python -m zeda_megatron.generate shares (conf/generate.yaml)
GENERATE_KEYS = ("model", "parallel", "data", "logging", "cluster", "seed")
CHECK_TITLE = "environment and inputs"


def memory_lines(cfg, world: int, on_cpu: bool) -> list[str]:
    """The planned memory per GPU (python -m zeda_megatron.plan's table), when it can be computed."""
    try:
        from zeda_megatron import plan as mplan
        from zeda_megatron.spec import resolve

        spec = resolve(cfg, world, inputs=False, on_gpu=not on_cpu)
        table = mplan.format_table(mplan.plan_with_fixes(spec), spec.model.name).splitlines()
    except Exception as e:  # noqa: BLE001 - the plan is information here; the trainer checks it for real
        return [f"planned memory: not computed ({type(e).__name__}: {str(e)[:200]})"]
    return ["planned memory (python -m zeda_megatron.plan):"] + ["  " + line for line in table if line.strip()]


def time_lines(common: list[str], gpu: str, job: dict, env: dict, world: int, n_prompts: int, sft_steps: int,
               opd_steps: int) -> list[str]:
    """The time plan of the job's phases on ``gpu`` (python -m zeda_megatron.plan --time's table) and
    the job runs it takes at a run's time limit: ``job.time_limit``, else the allocation's (Slurm's
    SLURM_JOB_START_TIME/END_TIME), else the sbatch scripts' 24:00:00. Information: never fails the job."""
    limit = job.get("time_limit")
    if not limit and env.get("SLURM_JOB_END_TIME", "").isdigit() and env.get("SLURM_JOB_START_TIME", "").isdigit():
        limit = (int(env["SLURM_JOB_END_TIME"]) - int(env["SLURM_JOB_START_TIME"])) / 3600
    try:
        from zeda_megatron.plan.time import time_plan_for

        text, _ = time_plan_for(common, gpu, time_limit=limit or "24:00:00", world=world,
                                n_prompts=n_prompts, sft_steps=sft_steps, opd_steps=opd_steps)
    except Exception as e:  # noqa: BLE001 - the time plan is information here
        return [f"time plan: not computed ({type(e).__name__}: {str(e)[:200]})"]
    return ["time plan (python -m zeda_megatron.plan --time):"] + ["  " + line for line in text.splitlines() if line.strip()]


def stage_overrides(common: list[str], stage: list[str], defaults: list[str], data: str, init: str,
                    extra: list[str]) -> list[str]:
    """A stage's overrides: the reference's defaults unless given, then the shared ones, its data and
    starting checkpoint, the job's cluster/W&B settings, and last its own (which win)."""
    return [*ov.unless(defaults, common + stage), *common, f"data.path={data}", f"model.init_checkpoint={init}",
            *extra, *stage]


def validate_stage(name: str, run_dir: str, overrides: list[str], world: int, later: list[str]):
    """The trainer's own config validation for the allocation; the checkpoint it starts from is written by
    an earlier phase and checked when that phase ran (``later``: what stands in for it now)."""
    from zeda_megatron.spec.compose import compose
    from zeda_megatron.training.validate import validate_config

    return validate_config(compose([*overrides, *later], run_dir), world, check_data=(name == "opd"))


def build_plan(family: str, run_dir: str | None, overrides: list[str], dry_run: bool, env: dict) -> dict:
    routed = ov.split_overrides(overrides)
    ph, inputs = routed["phase"], routed["inputs"]
    job = ov.settings(family, overrides, env)
    if run_dir and not routed["job"]["run_dir"]:
        job["run_dir"] = os.path.abspath(run_dir)
    run_dir = job["run_dir"]
    common = list(ph["common"])
    if not ov.has_key(common, "model"):
        common.insert(0, f"model={ov.FAMILY_MODEL[family]}")
    if not ov.has_key(common, "parallel"):
        common.insert(1, "parallel=reference_8gpu")
    nodes, nproc = job["nodes"], job["nproc_per_node"]
    world = nodes * nproc
    group = job["wandb_group"] or os.path.basename(run_dir)
    on_cpu = str(job["device"]) == "cpu"
    errors, notes = [], []
    from zeda_megatron.plan.devices import GPUS

    gpu = str(job["gpu"]).lower()   # the time plan's and the rehearsal's GPU
    if gpu not in GPUS:
        errors.append(f"job.gpu={job['gpu']}: unknown GPU for the time plan; use one of {sorted(GPUS)}")

    # the inputs
    from zeda_megatron.spec.compose import compose

    base = compose(common, run_dir)
    from omegaconf import OmegaConf

    hf_dir = None if "hf_dir" not in base.model or OmegaConf.is_missing(base.model, "hf_dir") else base.model.hf_dir
    prompts = os.path.abspath(inputs["prompts"]) if inputs["prompts"] else None
    responses = os.path.abspath(inputs["responses"]) if inputs["responses"] else None
    errors += ov.input_errors(family, hf_dir, prompts, responses)
    n_prompts = ov.count_lines(prompts)
    hf_dir = os.path.abspath(str(hf_dir)) if hf_dir else "MISSING-model.hf_dir"
    prompts = prompts or "MISSING-data.prompts"
    if n_prompts is None:
        n_prompts = REFERENCE["num_prompts"]
        notes.append(f"prompt count assumed {n_prompts} (the reference's); read from data.prompts when it exists")

    d = lambda *p: os.path.join(run_dir, *p)  # noqa: E731
    R = REFERENCE
    shared = (["cluster=slurm", f"cluster.nodes={nodes}", f"cluster.gpus_per_node={nproc}"] if env.get("SLURM_JOB_ID") else []) \
        + ([f"logging.wandb.group={group}"] if not ov.has_key(common, "logging.wandb.group") else [])
    convert_dir, sft_dir, opd_dir, hf_out, ev_out = d("convert"), d("sft"), d("opd"), d("hf"), d("eval")

    # stage 1: one epoch of the responses by default
    sft_ov = [o for o in ph["sft"] if not o.startswith("epochs=")]
    gbs1 = int(ov.value_of(ph["sft"] + common, "trainer.global_batch_size", R["sft"]["global_batch_size"]))
    epochs = float(ov.value_of(ph["sft"], "epochs", R["sft"]["epochs"]))
    n_sft = ov.count_lines(responses) or n_prompts
    steps1 = max(1, math.ceil(epochs * n_sft / gbs1))
    sft_data = responses or d("data", "stage1.jsonl")
    S1 = R["sft"]
    sft_defaults = [f"trainer.max_steps={steps1}", f"trainer.global_batch_size={S1['global_batch_size']}",
                    f"trainer.micro_batch_size={S1['micro_batch_size']}", f"trainer.seq_length={S1['seq_length']}",
                    "trainer.recompute=full", f"trainer.save_interval={S1['save_interval']}"]
    sft_cfg_ov = ["stage=sft", *stage_overrides(common, sft_ov, sft_defaults, sft_data, f"{convert_dir}/mcore", shared)]
    # stage 2
    S2 = R["opd"]
    opd_defaults = [f"trainer.max_steps={S2['max_steps']}", f"trainer.global_batch_size={S2['global_batch_size']}",
                    f"trainer.micro_batch_size={S2['micro_batch_size']}",
                    f"stage.samples_per_prompt={S2['samples_per_prompt']}",
                    f"stage.max_new_tokens={S2['max_new_tokens']}", f"stage.temperature={S2['temperature']}",
                    f"trainer.seq_length={S2['max_new_tokens'] + S2['prompt_tokens']}",
                    "trainer.recompute=full", f"trainer.save_interval={S2['save_interval']}"]
    opd_cfg_ov = ["stage=opd", *stage_overrides(common, ph["opd"], opd_defaults, prompts, d("sft", "checkpoints"), shared)]

    cfgs, plans = {}, {}
    for name, ovs in (("sft", sft_cfg_ov), ("opd", opd_cfg_ov)):
        cfgs[name] = compose(ovs, d(name))
        if errors or dry_run:
            continue
        from zeda_megatron.training.validate import ConfigError

        try:
            later = ["model.init_checkpoint=null"] + ([f"data.path={prompts}"] if name == "sft" and not responses else [])
            plans[name] = validate_stage(name, d(name), ovs, world, later)
        except ConfigError as e:
            errors.append(f"{e} (stage {1 if name == 'sft' else 2}: override it for this stage only with {name}.<key>=...)")
        except FileNotFoundError as e:
            errors.append(str(e))

    nx = cfgs["sft"].model.null_experts
    null_flag = ["--null-experts", str(nx.num)] if nx.num is not None else ["--null-ratio", str(nx.ratio)]
    lay = cfgs["sft"].parallel
    seed = int(cfgs["sft"].seed)
    phases = []

    # the rehearsal: both stages' trainer configs at full size on fake tensors, on this node's CPU, before
    # the first GPU hour (a CPU job has no GPU memory to fit)
    if not on_cpu:
        phases.append(Phase(
            "rehearse", "both stages rehearsed at full size on fake tensors (CPU)",
            ["-m", "zeda_megatron.pipeline", "rehearse", "--out", d("job", "rehearsal.json"), "--world", str(world),
             "--gpu", gpu, "--", *sft_cfg_ov, "--", *opd_cfg_ov], launcher="single", outputs=[d("job", "rehearsal.json")],
            advice="a stage does not fit the GPUs at these settings (the stage, rank and part are named above)",
            intro=[f"the trainer's own build and one step of each stage for every rank role of the layout ({world} "
                   f"processes), fake tensors on this node's CPU, against {gpu}'s memory (docs/rehearsal.md)",
                   f"out: {d('job', 'rehearsal.json')}; skip with job.phases=<the others>"]))
    # convert / inject
    conv = [os.path.join(REPO, "tools", "convert_hf.py"), "--hf-dir", hf_dir, "--out", convert_dir + ".tmp", *null_flag,
            "--seed", str(seed), "--tp", str(lay.tp), "--pp", str(lay.pp), "--ep", str(lay.ep),
            *ov.cli_args(ph["convert"] or ([] if not on_cpu else ["dtype=float32"]))]
    phases.append(Phase(
        "convert", "convert the HF checkpoint, inject null experts", conv, launcher="torchrun", inputs=[hf_dir],
        outputs=[convert_dir], atomic=convert_dir,
        nproc=min(nproc, int(lay.tp) * int(lay.pp) * int(lay.ep)) if not on_cpu else nproc,
        intro=[f"in: {hf_dir}; out: {convert_dir} (megatron-core dist checkpoint + zeda_bridge.json)",
               f"null experts: {' '.join(null_flag)} (w={nx.weight}), layout TP{lay.tp} PP{lay.pp} EP{lay.ep}"]))
    # stage-1 responses
    gen_out = d("data", "stage1.jsonl")
    gen_ov = [f"{k}={v}" for k, v in (("max_new_tokens", R["generate"]["max_new_tokens"]),
                                       ("temperature", R["generate"]["temperature"]), ("seed", seed))
              if not ov.has_key(ph["generate"], k)] + ph["generate"]
    if responses:
        phases.append(Phase("generate", "stage-1 responses (given: data.responses)", launcher="none",
                            outputs=[responses], intro=[f"data.responses={responses} given: no generation"]))
    else:
        gen_shared = [o for o in common if o.lstrip("+~").split("=", 1)[0].split(".")[0] in GENERATE_KEYS]
        gen = ["-m", "zeda_megatron.generate", *gen_shared, f"data.prompts={prompts}", f"output={gen_out}",
               f"hydra.run.dir={d('generate')}", *gen_ov]
        phases.append(Phase("generate", "stage-1 responses from the teacher", gen, launcher="torchrun", nproc=nproc,
                            inputs=[hf_dir, prompts], outputs=[gen_out],
                            intro=[f"teacher {hf_dir} answers {n_prompts} prompts from {prompts} -> {gen_out} (resumable)",
                                   f"settings: {' '.join(gen_ov)}"]))
    # prepare
    prep = ["-m", "zeda_megatron.prepare_data", *common, f"data.path={sft_data}", "stage=sft",
            f"trainer.seq_length={ov.value_of(sft_cfg_ov, 'trainer.seq_length', S1['seq_length'])}", *ph["prepare"]]
    phases.append(Phase("prepare", "prepare stage-1 data", prep, inputs=[sft_data], outputs=[sft_data],
                        intro=[f"tokenise/check {sft_data} for stage 1 ({n_sft} examples)"]))
    # the stages
    for name, ovs, n, ins in (("sft", sft_cfg_ov, 1, [convert_dir, sft_data]), ("opd", opd_cfg_ov, 2, [sft_dir, prompts])):
        c = cfgs[name]
        t, o = c.trainer, c.optim
        p = plans.get(name)
        lay_s = (f"TP{p.layout.tp} PP{p.layout.pp} EP{p.layout.ep} ETP{p.layout.etp} DP{p.layout.dp}, "
                 f"{p.trainer.num_microbatches} micro-batches/step" if p else f"TP{c.parallel.tp} PP{c.parallel.pp} EP{c.parallel.ep}")
        spp = int(c.stage.samples_per_prompt)
        intro = [f"stage {n} ({name}): {t.max_steps} steps, global batch {t.global_batch_size}"
                 + (f" ({int(t.global_batch_size) // spp} prompts x {spp} samples)" if name == "opd" else "")
                 + f", micro batch {t.micro_batch_size}, seq length {t.seq_length}"
                 + (f", response <= {c.stage.max_new_tokens} tokens, temperature {c.stage.temperature}" if name == "opd"
                    else f" ({epochs:g} epoch of {n_sft} examples)" if int(t.max_steps) == steps1 else ""),
                 f"optimizer: lr {o.lr} ({o.schedule}, warmup {o.warmup_fraction}, min {o.min_lr}), wd {o.weight_decay}, "
                 f"betas {o.adam_beta1}/{o.adam_beta2}",
                 f"layout: {lay_s}; {world} processes; recompute {t.recompute}",
                 f"data: {c.data.path}; from: {c.model.init_checkpoint}",
                 f"out: {d(name)} (checkpoints every {t.save_interval} steps and on the signal; metrics.jsonl)"]
        intro += memory_lines(c, world, on_cpu)
        phases.append(train_phase(name, f"stage {n} ({'off-policy' if name == 'sft' else 'on-policy'})", d(name), ovs,
                                  int(t.max_steps), inputs=ins, nproc=nproc, intro=intro))
    # export: the ranks of the expert-parallel layout, on the first node
    exp_n = 1 if on_cpu and nproc == 1 else min(nproc, int(cfgs["opd"].parallel.ep))
    phases.append(export_phase(
        "export", "export to a Hugging Face folder", d("opd", "checkpoints"), hf_out, inputs=[opd_dir], ep=exp_n,
        extra=ov.cli_args(ph["export"]), launcher="torchrun",
        intro=[f"{d('opd', 'checkpoints')} -> {hf_out} (trust_remote_code when null experts; EP{exp_n})"]))
    phases[-1].nodes = 1
    # evaluate
    ev = ["-m", "zeda_megatron.evaluate", *common, f"evaluate.student={hf_out}", f"evaluate.out_dir={ev_out}",
          f"hydra.run.dir={ev_out}", *[f"evaluate.{o}" for o in ph["evaluate"]]]
    phases.append(Phase("evaluate", "evaluate the export against the teacher", ev, inputs=[hf_out, hf_dir],
                        outputs=[ev_out], intro=[f"{hf_out} vs teacher {hf_dir} -> {ev_out} (eval.json)"]))

    number(phases, run_dir, first=1)
    assign_keys(phases, run_dir)
    wanted = [p.strip() for p in str(job["phases"]).split(",") if p.strip()]
    errors += [f"job.phases: {w!r} is unknown; phases: {','.join(ov.WORK_PHASES)}" for w in wanted if w not in ov.WORK_PHASES]
    check = {"name": "check", "index": 0, "title": CHECK_TITLE, "intro": [
        f"python, torch{' + CUDA, megatron-core, Transformer Engine' if not on_cpu else ', megatron-core (CPU run)'} on every node",
        f"inputs: model.hf_dir={hf_dir}, data.prompts={prompts} ({n_prompts} prompts)",
        f"both stages' configs validated for {nodes} node(s) x {nproc} processes = {world}",
        *([] if on_cpu else time_lines(common, gpu, job, env, world, n_prompts, steps1,
                                                  int(cfgs["opd"].trainer.max_steps)))]}
    return {"family": family, "model": str(base.model.name), "run_dir": run_dir, "nodes": nodes, "nproc_per_node": nproc,
            "world": world, "wandb_group": group, "job": job, "check": check,
            "phases": [p.to_dict() for p in phases], "wanted": wanted, "errors": errors,
            "notes": notes + [n for p in plans.values() for n in p.notes if "without model.init_checkpoint" not in n],
            "n_prompts": n_prompts, "reference": {"sft_steps": steps1}, "created": time.time()}
