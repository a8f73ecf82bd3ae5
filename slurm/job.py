#!/usr/bin/env python
"""The planner behind slurm/adapt.sh (one job, every phase). Not a user command; adapt.sh calls:

    python slurm/job.py env   [--need-cuda] [--gpus N]      # on each node: python/torch/CUDA/megatron/TE
    python slurm/job.py plan  --family glm --run-dir RUN [--dry-run] -- OVERRIDES...
    python slurm/job.py intro RUN PHASE                     # what a phase will do (head of its log)
    python slurm/job.py outro RUN PHASE                     # what it did (tail of its log)
    python slurm/job.py state RUN PHASE                     # exit 0: complete, 3: started, not complete
    python slurm/job.py mark  RUN PHASE                     # record a phase as complete
    python slurm/job.py grace RUN PHASE                     # grace period check after a training phase

``plan`` turns the job's Hydra overrides into one command per phase, with the reference's hyper-parameters
(docs/method.md sections 4-5) as defaults, checks the inputs and both stages' configs, and writes
RUN/job/plan.json and RUN/job/phases.sh (bash arrays). Overrides are routed by prefix:

    model.* / parallel=... / seed=... / logging.* / optim.* / trainer.* / stage.* / data.*   both stages
    sft.<key>=V / opd.<key>=V        one stage only (e.g. sft.trainer.max_steps=10, opd.optim.lr=2e-6)
    generate.<key>=V  prepare.<key>=V  eval.<key>=V  convert.<key>=V  export.<key>=V   that phase's command
    data.prompts=FILE                the prompts JSONL (stage-1 generation and stage-2 sampling)
    data.responses=FILE              stage-1 prompt/response JSONL made elsewhere (skips generation)
    job.<key>=V                      the job itself (see JOB_DEFAULTS)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time

HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("check", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate")
TRAIN_PHASES = ("sft", "opd")
FAMILY_MODEL = {"glm": "glm47_flash", "qwen": "qwen3_30b_a3b"}
PHASE_PREFIXES = {"sft": "sft", "stage1": "sft", "opd": "opd", "stage2": "opd", "generate": "generate",
                  "prepare": "prepare", "eval": "evaluate", "evaluate": "evaluate", "convert": "convert",
                  "export": "export", "job": "job"}

# The reference release (docs/method.md sections 4-5), for the released models on one 8-GPU node.
REFERENCE = {
    "num_prompts": 60000,              # ZEDA-prompts-60k.jsonl (the count is read from data.prompts when given)
    "sft": {"epochs": 1, "global_batch_size": 128, "micro_batch_size": 1, "seq_length": 65536,
            "lr": "model.reference_lr.sft (2e-5)", "schedule": "cosine", "warmup_fraction": 0.1},
    "opd": {"max_steps": 321, "prompts_per_step": 16, "samples_per_prompt": 2, "global_batch_size": 32,
            "micro_batch_size": 2, "max_new_tokens": 32768, "prompt_tokens": 4096, "temperature": 1.0,
            "schedule": "constant"},
    # stage-1 responses: sampled from the original model; the reference does not state its settings
    "generate": {"max_new_tokens": 32768, "temperature": 1.0},
}

# the parts of the training config that python -m zeda_megatron.generate shares (conf/generate.yaml)
GENERATE_KEYS = ("model", "parallel", "data", "logging", "cluster", "seed")

JOB_DEFAULTS = {
    "run_dir": None,            # default runs/<model.name>-<SLURM_JOB_ID> (stable across requeues)
    "nodes": None,              # default SLURM_NNODES (1 outside Slurm)
    "nproc_per_node": None,     # default: GPUs on the node (SLURM_GPUS_ON_NODE, else 8)
    "device": "cuda",           # cuda | cpu (cpu: no CUDA/TE check; tests and CPU-only trials)
    "phases": ",".join(PHASES),  # run these (in order); others are skipped
    "grace_s": 900,             # the signal lead time of #SBATCH --signal=B:USR1@N (keep them equal)
    "ckpt_write_gbps": 1.0,     # filesystem write speed per node, for the grace period check
    "progress_every_s": 300,    # how often the job log repeats a phase's last progress line
    "max_requeues": 50,         # stop requeueing after this many restarts
    "rdzv_port": None,          # default: derived from the job id
    "wandb_group": None,        # default: the run folder's name (all phases, both stages)
}


def say(msg: str, stream=sys.stdout) -> None:
    print(msg, file=stream, flush=True)


# ---- overrides ---------------------------------------------------------------------------------------
def split_overrides(overrides: list[str]) -> dict:
    """Route Hydra overrides to the phases (see the module docstring)."""
    out = {k: [] for k in ("common", "sft", "opd", "generate", "prepare", "evaluate", "convert", "export")}
    job, inputs = dict(JOB_DEFAULTS), {"prompts": None, "responses": None}
    for ov in overrides:
        if "=" not in ov:
            raise SystemExit(f"[check] error: {ov!r} is not a Hydra override (key=value)")
        key, value = ov.split("=", 1)
        bare = key.lstrip("+~")
        head, _, rest = bare.partition(".")
        if bare in ("data.prompts", "data.responses"):
            inputs[bare.split(".")[1]] = value or None
        elif head in PHASE_PREFIXES and rest:
            phase = PHASE_PREFIXES[head]
            if phase == "job":
                if rest not in JOB_DEFAULTS:
                    raise SystemExit(f"[check] error: job.{rest} is unknown; job keys: {sorted(JOB_DEFAULTS)}")
                job[rest] = value
            else:
                out[phase].append(key[: len(key) - len(bare)] + rest + "=" + value)
        else:
            out["common"].append(ov)
    return {"phase": out, "job": job, "inputs": inputs}


def check_inputs(family: str, overrides: list[str]) -> list[str]:
    """The job's inputs, from the overrides alone (stdlib only, sub-second): model.hf_dir, data.prompts."""
    routed = split_overrides(overrides)
    hf_dir = _value(routed["phase"]["common"], "model.hf_dir", None)
    prompts, responses = routed["inputs"]["prompts"], routed["inputs"]["responses"]
    if hf_dir in ("null", "???"):
        hf_dir = None
    return input_errors(family, hf_dir, prompts, responses)


def input_errors(family: str, hf_dir: str | None, prompts: str | None, responses: str | None) -> list[str]:
    """What is wrong with the job's inputs, each naming the override that fixes it."""
    errors = []
    if not hf_dir:
        errors.append(f"model.hf_dir is not set: add model.hf_dir=/path/to/{'GLM-4.7-Flash' if family == 'glm' else 'Qwen3-30B-A3B'} "
                      "(the original model's Hugging Face folder)")
    elif not os.path.isfile(os.path.join(str(hf_dir), "config.json")):
        errors.append(f"model.hf_dir={hf_dir} has no config.json: not a Hugging Face model folder")
    if not prompts:
        errors.append("data.prompts is not set: add data.prompts=/path/to/prompts.jsonl (one {\"prompt\": ...} per line)")
    elif not os.path.isfile(prompts):
        errors.append(f"data.prompts={prompts} does not exist")
    elif os.path.getsize(prompts) == 0:
        errors.append(f"data.prompts={prompts} is empty")
    if responses and not os.path.isfile(responses):
        errors.append(f"data.responses={responses} does not exist")
    return errors


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(HOME, "conf"), version_base=None):
        return hcompose("config", overrides=overrides)


def has_key(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def count_prompts(path: str | None) -> int | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fingerprint(obj, run_dir: str) -> str:
    """Key of a phase's work: its command with the run folder abstracted (a copied run folder still matches)."""
    blob = json.dumps(obj, sort_keys=True).replace(run_dir, "<RUN>")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cli_args(overrides: list[str]) -> list[str]:
    """convert.dtype=float32 -> --dtype float32 (argparse tools)."""
    out = []
    for ov in overrides:
        k, v = ov.split("=", 1)
        flag = "--" + k.replace("_", "-")
        out += [flag] if v.lower() == "true" else ([] if v.lower() == "false" else [flag, v])
    return out


# ---- plan --------------------------------------------------------------------------------------------
def build_plan(family: str, run_dir: str, overrides: list[str], dry_run: bool, env: dict, inputs_only: bool = False) -> dict:
    routed = split_overrides(overrides)
    ph, job, inputs = routed["phase"], routed["job"], routed["inputs"]
    common = list(ph["common"])
    if not has_key(common, "model"):
        common.insert(0, f"model={FAMILY_MODEL[family]}")
    if not has_key(common, "parallel"):
        common.insert(1, "parallel=reference_8gpu")
    run_dir = os.path.abspath(job["run_dir"] or run_dir)
    nodes = int(job["nodes"] or env.get("SLURM_NNODES") or 1)
    nproc = int(job["nproc_per_node"] or env.get("SLURM_GPUS_ON_NODE") or 8)
    world = nodes * nproc
    group = job["wandb_group"] or os.path.basename(run_dir)
    errors, notes = [], []

    # the inputs
    base = compose([f"run_dir={run_dir}", *common])
    hf_dir = base.model.get("hf_dir") if "hf_dir" in base.model and not _missing(base.model, "hf_dir") else None
    model_name = str(base.model.name)
    prompts = inputs["prompts"]
    if prompts:
        inputs["prompts"] = prompts = os.path.abspath(prompts)
    if inputs["responses"]:
        inputs["responses"] = os.path.abspath(inputs["responses"])
    errors += input_errors(family, hf_dir, prompts, inputs["responses"])
    if inputs_only:
        return {"errors": errors}
    n_prompts = count_prompts(prompts)
    hf_dir = os.path.abspath(str(hf_dir)) if hf_dir else "MISSING-model.hf_dir"
    prompts = prompts or "MISSING-data.prompts"
    if n_prompts is None:
        n_prompts = REFERENCE["num_prompts"]
        notes.append(f"prompt count assumed {n_prompts} (the reference's); read from data.prompts when it exists")

    d = lambda *p: os.path.join(run_dir, *p)  # noqa: E731
    R = REFERENCE
    wb = [f"logging.wandb.group={group}"] if not has_key(common, "logging.wandb.group") else []
    cluster = ["cluster=slurm", f"cluster.nodes={nodes}", f"cluster.gpus_per_node={nproc}"] if env.get("SLURM_JOB_ID") else []

    # stage 1
    sft_ov = list(ph["sft"])
    gbs1 = int(_value(sft_ov + common, "trainer.global_batch_size", R["sft"]["global_batch_size"]))
    epochs = float(_value(sft_ov, "epochs", R["sft"]["epochs"]))
    sft_ov = [o for o in sft_ov if not o.startswith("epochs=")]
    n_sft = count_prompts(inputs["responses"]) or n_prompts
    steps1 = max(1, math.ceil(epochs * n_sft / gbs1))
    sft_data = inputs["responses"] or d("data", "stage1.jsonl")
    sft_defaults = [f"trainer.max_steps={steps1}", f"trainer.global_batch_size={R['sft']['global_batch_size']}",
                    f"trainer.micro_batch_size={R['sft']['micro_batch_size']}", f"trainer.seq_length={R['sft']['seq_length']}",
                    "trainer.recompute=full", "trainer.save_interval=50"]
    convert_dir = d("convert")
    sft_cfg_ov = ["stage=sft", *_unless(sft_defaults, common + sft_ov), *common, f"data.path={sft_data}",
                  f"model.init_checkpoint={convert_dir}/mcore", *cluster, *wb, *sft_ov]
    # stage 2
    opd_ov = list(ph["opd"])
    opd_defaults = [f"trainer.max_steps={R['opd']['max_steps']}", f"trainer.global_batch_size={R['opd']['global_batch_size']}",
                    f"trainer.micro_batch_size={R['opd']['micro_batch_size']}",
                    f"stage.samples_per_prompt={R['opd']['samples_per_prompt']}",
                    f"stage.max_new_tokens={R['opd']['max_new_tokens']}", f"stage.temperature={R['opd']['temperature']}",
                    f"trainer.seq_length={R['opd']['max_new_tokens'] + R['opd']['prompt_tokens']}",
                    "trainer.recompute=full", "trainer.save_interval=20"]
    opd_cfg_ov = ["stage=opd", *_unless(opd_defaults, common + opd_ov), *common, f"data.path={prompts}",
                  f"model.init_checkpoint={d('sft', 'checkpoints')}", *cluster, *wb, *opd_ov]

    cfgs, plans = {}, {}
    for name, ovs in (("sft", sft_cfg_ov), ("opd", opd_cfg_ov)):
        cfg = compose([f"run_dir={d(name)}", *ovs])
        cfgs[name] = cfg
        if errors or dry_run:
            continue
        from zeda_megatron.training.validate import ConfigError, validate_config

        try:
            # the checkpoint it starts from is written by an earlier phase: checked when that phase ran
            later = ["model.init_checkpoint=null"] + ([f"data.path={prompts}"] if name == "sft" and not inputs["responses"] else [])
            vcfg = compose([f"run_dir={d(name)}", *ovs, *later])
            plans[name] = validate_config(vcfg, world, check_data=(name == "opd"))
        except ConfigError as e:
            key_hint = f" (stage {1 if name == 'sft' else 2}: override it for this stage only with {name}.<key>=...)"
            errors.append(str(e) + key_hint)
        except FileNotFoundError as e:
            errors.append(str(e))

    # null experts for the convert phase, as the trainer would inject them
    nx = cfgs["sft"].model.null_experts
    null_flag = ["--null-experts", str(nx.num)] if nx.num is not None else ["--null-ratio", str(nx.ratio)]
    lay = cfgs["sft"].parallel
    seed = int(cfgs["sft"].seed)
    on_cpu = str(job["device"]) == "cpu"

    phases = []

    def add(name, title, launcher, cmd, outputs, intro, nproc_=None, atomic=None):
        key = fingerprint([cmd, launcher], run_dir)
        phases.append({"name": name, "title": title, "launcher": launcher, "cmd": [str(c) for c in cmd],
                       "nproc": nproc_ or nproc, "outputs": outputs, "intro": intro, "key": key, "atomic": atomic or "",
                       "log": d("logs", f"{PHASES.index(name)}-{name}.log")})

    add("check", "environment and inputs", "none", [], [d("job", "plan.json")],
        [f"python, torch{' + CUDA, megatron-core, Transformer Engine' if not on_cpu else ', megatron-core (CPU run)'} on every node",
         f"inputs: model.hf_dir={hf_dir}, data.prompts={prompts} ({n_prompts} prompts)",
         f"both stages' configs validated for {nodes} node(s) x {nproc} processes = {world}"])
    # convert / inject
    conv = [os.path.join(HOME, "tools", "convert_hf.py"), "--hf-dir", hf_dir, "--out", convert_dir + ".tmp", *null_flag,
            "--seed", str(seed), "--tp", str(lay.tp), "--pp", str(lay.pp), "--ep", str(lay.ep),
            *cli_args(ph["convert"] or ([] if not on_cpu else ["dtype=float32"]))]
    add("convert", "convert the HF checkpoint, inject null experts", "torchrun", conv, [convert_dir],
        [f"in: {hf_dir}; out: {convert_dir} (megatron-core dist checkpoint + zeda_bridge.json)",
         f"null experts: {' '.join(null_flag)} (w={nx.weight}), layout TP{lay.tp} PP{lay.pp} EP{lay.ep}"],
        nproc_=min(nproc, int(lay.tp) * int(lay.pp) * int(lay.ep)) if not on_cpu else nproc, atomic=convert_dir)
    # stage-1 responses
    gen_out = d("data", "stage1.jsonl")
    gen_ov = [f"{k}={v}" for k, v in (("max_new_tokens", R["generate"]["max_new_tokens"]),
                                       ("temperature", R["generate"]["temperature"]), ("seed", seed))
              if not has_key(ph["generate"], k)] + ph["generate"]
    if inputs["responses"]:
        add("generate", "stage-1 responses (given: data.responses)", "none", [], [inputs["responses"]],
            [f"data.responses={inputs['responses']} given: no generation"])
    elif module_exists("zeda_megatron.generate"):
        shared = [o for o in common if o.lstrip("+~").split("=", 1)[0].split(".")[0] in GENERATE_KEYS]
        gen = ["-m", "zeda_megatron.generate", *shared, f"data.prompts={prompts}", f"output={gen_out}",
               f"hydra.run.dir={d('generate')}", *gen_ov]
        add("generate", "stage-1 responses from the teacher", "torchrun", gen, [gen_out],
            [f"teacher {hf_dir} answers {n_prompts} prompts from {prompts} -> {gen_out} (resumable)",
             f"settings: {' '.join(gen_ov)}"])
    else:
        kv = dict(o.split("=", 1) for o in gen_ov)
        gen = [os.path.join(HOME, "tools", "generate_responses.py"), "--teacher", hf_dir, "--prompts", prompts,
               "--out", gen_out, *cli_args([f"{k}={v}" for k, v in kv.items()])]
        add("generate", "stage-1 responses from the teacher", "single", gen, [gen_out],
            [f"teacher {hf_dir} answers {n_prompts} prompts from {prompts} -> {gen_out} (resumable; "
             "tools/generate_responses.py: python -m zeda_megatron.generate is not installed)",
             f"settings: {' '.join(gen_ov)}"])
    # prepare
    if module_exists("zeda_megatron.prepare_data"):
        prep = ["-m", "zeda_megatron.prepare_data", *common, f"data.path={sft_data}", "stage=sft",
                f"trainer.seq_length={_value(sft_cfg_ov, 'trainer.seq_length', R['sft']['seq_length'])}", *ph["prepare"]]
        add("prepare", "prepare stage-1 data", "single", prep, [sft_data],
            [f"tokenise/check {sft_data} for stage 1 ({n_sft} examples)"])
    else:
        add("prepare", "prepare stage-1 data", "none", [], [sft_data],
            [f"no prepare command installed (python -m zeda_megatron.prepare_data): the trainer reads {sft_data} directly"])
    # the stages
    for name, ovs, n in (("sft", sft_cfg_ov, 1), ("opd", opd_cfg_ov, 2)):
        c = cfgs[name]
        t, o = c.trainer, c.optim
        p = plans.get(name)
        lay_s = (f"TP{p.layout.tp} PP{p.layout.pp} EP{p.layout.ep} ETP{p.layout.etp} DP{p.layout.dp}, "
                 f"{p.trainer.num_microbatches} micro-batches/step"
                 if p else f"TP{c.parallel.tp} PP{c.parallel.pp} EP{c.parallel.ep}")
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
        intro += memory_lines(cfgs.get(name), world, on_cpu)
        add(name, f"stage {n} ({'off-policy' if name == 'sft' else 'on-policy'})", "torchrun",
            ["-m", "zeda_megatron.train", *ovs, f"hydra.run.dir={d(name)}"], [d(name, "summary.json")], intro)
        phases[-1]["max_steps"] = int(t.max_steps)
    # export
    hf_out = d("hf")
    exp_n = 1 if on_cpu and nproc == 1 else min(nproc, int(cfgs["opd"].parallel.ep))
    exp = [os.path.join(HOME, "tools", "export_hf.py"), "--checkpoint", d("opd", "checkpoints"), "--out", hf_out + ".tmp",
           "--ep", str(exp_n), *cli_args(ph["export"])]
    add("export", "export to a Hugging Face folder", "torchrun", exp, [hf_out],
        [f"{d('opd', 'checkpoints')} -> {hf_out} (trust_remote_code when null experts; EP{exp_n})"], nproc_=exp_n,
        atomic=hf_out)
    # evaluate
    ev_out = d("eval")
    if module_exists("zeda_megatron.evaluate"):
        ev = ["-m", "zeda_megatron.evaluate", *common, f"evaluate.student={hf_out}", f"evaluate.out_dir={ev_out}",
              f"hydra.run.dir={ev_out}", *[f"evaluate.{o}" for o in ph["evaluate"]]]
    else:
        ev = [os.path.join(HOME, "slurm", "job.py"), "evaluate-fallback", hf_dir, hf_out, ev_out, *ph["evaluate"]]
    add("evaluate", "evaluate the export against the teacher", "single", ev, [ev_out],
        [f"{hf_out} vs teacher {hf_dir} -> {ev_out} (summary.json)"])

    wanted = [p.strip() for p in str(job["phases"]).split(",") if p.strip()]
    for w in wanted:
        if w not in PHASES:
            errors.append(f"job.phases: {w!r} is unknown; phases: {','.join(PHASES)}")
    return {"family": family, "model": model_name, "run_dir": run_dir, "nodes": nodes, "nproc_per_node": nproc,
            "world": world, "wandb_group": group, "job": job, "phases": phases, "wanted": wanted, "errors": errors,
            "notes": notes + [n for p in plans.values() for n in p.notes if "without model.init_checkpoint" not in n], "n_prompts": n_prompts,
            "reference": {"sft_steps": steps1}, "created": time.time()}


def memory_lines(cfg, world: int, on_cpu: bool) -> list[str]:
    """The planned memory per GPU (python -m zeda_megatron.plan's table), when it can be computed."""
    if cfg is None:
        return []
    try:
        from zeda_megatron import plan as mplan
        from zeda_megatron.spec import resolve

        spec = resolve(cfg, world, inputs=False, on_gpu=not on_cpu)
        table = mplan.format_table(mplan.plan_with_fixes(spec), spec.model.name).splitlines()
    except Exception as e:  # noqa: BLE001 - the plan is information here; the trainer checks it for real
        return [f"planned memory: not computed ({type(e).__name__}: {str(e)[:200]})"]
    return ["planned memory (python -m zeda_megatron.plan):"] + ["  " + line for line in table if line.strip()]


def _missing(node, key) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_missing(node, key)


def _value(overrides: list[str], key: str, default):
    for o in reversed(overrides):
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return default


def _unless(defaults: list[str], given: list[str]) -> list[str]:
    return [o for o in defaults if not has_key(given, o.split("=", 1)[0])]


def write_plan(plan: dict) -> None:
    jd = os.path.join(plan["run_dir"], "job")
    os.makedirs(jd, exist_ok=True)
    os.makedirs(os.path.join(plan["run_dir"], "logs"), exist_ok=True)
    tmp = os.path.join(jd, "plan.json.tmp")
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=1)
    os.replace(tmp, os.path.join(jd, "plan.json"))
    lines = [f"RUN={shlex.quote(plan['run_dir'])}", f"NNODES={plan['nodes']}", f"NPROC={plan['nproc_per_node']}",
             f"WANTED=({' '.join(plan['wanted'])})"]
    for p in plan["phases"]:
        n = p["name"]
        lines.append(f"CMD_{n}=({' '.join(shlex.quote(c) for c in p['cmd'])})")
        lines.append(f"LAUNCH_{n}={p['launcher']}; NPROC_{n}={p['nproc']}; LOG_{n}={shlex.quote(p['log'])}; "
                     f"ATOMIC_{n}={shlex.quote(p['atomic'])}")
    with open(os.path.join(jd, "phases.sh"), "w") as f:
        f.write("\n".join(lines) + "\n")


def print_plan(plan: dict, dry_run: bool) -> None:
    say(f"[zeda] plan: {plan['model']} ({plan['family']}), {plan['nodes']} node(s) x {plan['nproc_per_node']} "
        f"processes; run folder {plan['run_dir']}; W&B group {plan['wandb_group']}")
    for p in plan["phases"]:
        skip = "" if p["name"] in plan["wanted"] else "  (not in job.phases: skipped)"
        say(f"[zeda]  {PHASES.index(p['name'])}. {p['name']:9s} {p['title']}{skip}")
        for line in p["intro"]:
            say(f"[zeda]       {line}")
        if dry_run and p["cmd"]:
            launcher = {"torchrun": f"srun torchrun x{p['nproc']}/node", "single": "srun (1 task)"}.get(p["launcher"], "")
            say(f"[zeda]       $ {launcher} python {' '.join(shlex.quote(c) for c in p['cmd'])}")
    for n in plan["notes"]:
        say(f"[zeda] note: {n}")


# ---- phase state -------------------------------------------------------------------------------------
def load_plan(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "job", "plan.json")) as f:
        return json.load(f)


def phase_of(plan: dict, name: str) -> dict:
    return next(p for p in plan["phases"] if p["name"] == name)


def marker(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "job", f"{name}.done")


def train_progress(stage_dir: str, total: int = -1) -> tuple[int, int]:
    """(steps done, max steps) of a training stage from its summary.json / metrics.jsonl (stdlib only:
    these light commands run in the batch shell, with whatever python3 the node has)."""
    done = 0
    try:
        with open(os.path.join(stage_dir, "summary.json")) as f:
            done = int(json.load(f)["steps_done"])
    except (OSError, ValueError, KeyError):
        try:
            with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
                for line in f:
                    if line.strip():
                        done = max(done, int(json.loads(line).get("step", 0)))
        except (OSError, ValueError):
            pass
    return done, int(total)


def phase_complete(plan: dict, name: str) -> bool:
    p = phase_of(plan, name)
    try:
        with open(marker(plan["run_dir"], name)) as f:
            if json.load(f).get("key") != p["key"]:
                return False
    except (OSError, ValueError):
        return False
    if name in TRAIN_PHASES:
        stage_dir = os.path.join(plan["run_dir"], name)
        done, total = train_progress(stage_dir, p.get("max_steps", -1))
        # metrics are written before the save: complete only once the last step's checkpoint is there
        ckpt = _latest_ckpt(stage_dir)
        m = re.match(r"^iter_(\d+)$", os.path.basename(os.path.normpath(ckpt))) if ckpt else None
        return total > 0 and done >= total and m is not None and int(m.group(1)) >= total
    return all(os.path.exists(o) for o in p["outputs"])


def cmd_state(run_dir: str, name: str) -> int:
    plan = load_plan(run_dir)
    if phase_complete(plan, name):
        return 0
    if os.path.isfile(marker(run_dir, name)):
        say(f"[zeda] {name}: its command changed since it completed: running it again")
    return 3


def cmd_mark(run_dir: str, name: str) -> int:
    plan = load_plan(run_dir)
    p = phase_of(plan, name)
    if name in TRAIN_PHASES:
        done, total = train_progress(os.path.join(run_dir, name), p.get("max_steps", -1))
        if total <= 0 or done < total:
            say(f"[zeda] {name} stopped at step {done}/{total}: not complete")
            return 3
    with open(marker(run_dir, name), "w") as f:
        json.dump({"key": p["key"], "time": time.time()}, f)
    return 0


def cmd_intro(run_dir: str, name: str) -> int:
    plan = load_plan(run_dir)
    p = phase_of(plan, name)
    say(f"==== phase {PHASES.index(name)} {name}: {p['title']} ({time.strftime('%Y-%m-%d %H:%M:%S')}) ====")
    for line in p["intro"]:
        say(f"  {line}")
    if name in TRAIN_PHASES:
        done, total = train_progress(os.path.join(run_dir, name), p.get("max_steps", -1))
        if done:
            say(f"  resuming: {done}/{total} steps already done")
    if p["cmd"]:
        say("  $ python " + " ".join(shlex.quote(c) for c in p["cmd"]))
    return 0


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.path.getsize(os.path.join(root, fn))
            except OSError:
                pass
    return total


def _latest_ckpt(stage_dir: str) -> str | None:
    m = os.path.join(stage_dir, "checkpoints", "latest")
    try:
        with open(m) as f:
            name = f.read().strip()
    except OSError:
        return None
    path = name if os.path.isabs(name) else os.path.join(stage_dir, "checkpoints", name)
    return path if os.path.isdir(path) else None


def grace_needed(ckpt_bytes: int, max_step_s: float, write_gbps: float) -> dict:
    """Seconds needed between the pre-time-limit signal and the kill: finish the step in flight, save
    the checkpoint (size / write speed), plus a fixed margin for process exit and the requeue call."""
    save_s = ckpt_bytes / (write_gbps * 1e9)
    return {"save_s": save_s, "step_s": max_step_s, "margin_s": 60.0, "total_s": max_step_s + save_s + 60.0}


def cmd_outro(run_dir: str, name: str) -> int:
    plan = load_plan(run_dir)
    p = phase_of(plan, name)
    if name in TRAIN_PHASES:
        sd = os.path.join(run_dir, name)
        done, total = train_progress(sd, p.get("max_steps", -1))
        last = {}
        try:
            with open(os.path.join(sd, "summary.json")) as f:
                last = json.load(f).get("last") or {}
        except (OSError, ValueError):
            pass
        say(f"  did: {done}/{total} steps; final loss {last.get('loss', float('nan')):.4f}, kl {last.get('kl', float('nan')):.4f}, "
            f"null share {last.get('null_share', float('nan')):.3f}, expert FLOPs removed {last.get('expert_flops_removed', float('nan')):.1%}")
        ck = _latest_ckpt(sd)
        if ck:
            size = _size(ck)
            steps = []
            try:
                with open(os.path.join(sd, "metrics.jsonl")) as f:
                    steps = [json.loads(line).get("step_time_s", 0.0) for line in f if line.strip()]
            except (OSError, ValueError):
                pass
            g = grace_needed(size, max(steps or [0.0]), float(plan["job"]["ckpt_write_gbps"]))
            have = float(plan["job"]["grace_s"])
            say(f"  checkpoint {ck}: {size / 1e9:.2f} GB; longest step {g['step_s']:.0f} s -> grace needed ~"
                f"{g['total_s']:.0f} s (step + save at {plan['job']['ckpt_write_gbps']} GB/s + 60 s); job.grace_s={have:.0f}"
                + ("" if have >= g["total_s"] else "  WARNING: too short; raise #SBATCH --signal=B:USR1@N and job.grace_s"))
    else:
        for o in p["outputs"]:
            if os.path.exists(o):
                say(f"  did: {o} ({_size(o) / 1e6:.1f} MB)" if os.path.isdir(o) else f"  did: {o} ({os.path.getsize(o) / 1e6:.2f} MB)")
        if name == "evaluate":
            try:
                ej = os.path.join(run_dir, "eval", "eval.json")
                with open(ej if os.path.isfile(ej) else os.path.join(run_dir, "eval", "summary.json")) as f:
                    s = json.load(f)
                say("  scores: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items() if isinstance(v, (int, float)))[:600])
            except (OSError, ValueError):
                pass
    return 0


# ---- environment -------------------------------------------------------------------------------------
HOWTO = """how to build the environment (no installs happen on compute nodes):
  A) on a login node with a shared filesystem:  bash scripts/setup.sh   (then PYTHON=$PWD/.venv/bin/python, the default);
     on GPU nodes also Transformer Engine: .venv/bin/pip install --no-build-isolation transformer_engine[pytorch]
  B) an NGC PyTorch container (torch + CUDA + Transformer Engine inside) with the project on top:
     pip install --no-deps -e . && pip install -r requirements.txt --no-deps (minus torch), then submit with
     SRUN_ARGS="--container-image=<image> --container-mounts=<shared fs>" PYTHON=python sbatch slurm/adapt_glm.sh ...
  see docs/slurm.md."""


def cmd_env(need_cuda: bool, gpus: int) -> int:
    import platform

    host = platform.node()
    problems, facts = [], [f"python {sys.version.split()[0]} ({sys.executable})"]
    if sys.version_info < (3, 11):
        problems.append(f"python >= 3.11 needed, found {sys.version.split()[0]}")
    try:
        import torch

        facts.append(f"torch {torch.__version__}")
        if need_cuda:
            if not torch.cuda.is_available():
                problems.append(f"torch {torch.__version__} sees no CUDA device (CPU build, or no GPU on {host}); "
                                "run on GPU nodes with a CUDA build of torch (job.device=cpu for a CPU trial)")
            else:
                n = torch.cuda.device_count()
                facts.append(f"CUDA {torch.version.cuda}, {n} x {torch.cuda.get_device_name(0)}")
                if n < gpus:
                    problems.append(f"{n} GPUs visible on {host}, the job wants {gpus} per node (job.nproc_per_node)")
    except Exception as e:  # noqa: BLE001
        problems.append(f"torch does not import: {e}")
    try:
        import megatron.core

        facts.append(f"megatron-core {megatron.core.__version__}")
        if megatron.core.__version__.split("+")[0] != "0.19.2":
            problems.append(f"megatron-core 0.19.2 is the tested version, found {megatron.core.__version__}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"megatron-core does not import: {e}")
    if need_cuda:
        try:
            import transformer_engine  # noqa: F401
            import transformer_engine.pytorch  # noqa: F401

            facts.append(f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"Transformer Engine (transformer_engine.pytorch) does not import: {e}")
    for mod in ("transformers", "hydra", "zeda_megatron"):
        if not module_exists(mod):
            problems.append(f"python package {mod!r} is missing")
    say(f"[check] {host}: " + ", ".join(facts))
    if problems:
        for p in problems:
            say(f"[check] error on {host}: {p}", sys.stderr)
        say(HOWTO, sys.stderr)
        return 2
    return 0


def cmd_evaluate_fallback(teacher: str, student: str, out: str, extra: list[str]) -> int:
    """Until python -m zeda_megatron.evaluate exists: held-out NLL/KL of the export vs the teacher."""
    from zeda_megatron.embedded import evaluate

    n = int(_value(extra, "n_chunks", 16))
    tmp = out + ".tmp"
    summary = evaluate.evaluate(teacher, student, out_dir=tmp, seed=0, n_chunks=n)
    with open(os.path.join(tmp, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        say(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    sys.path.insert(0, HOME)
    if cmd == "env":
        a = argparse.ArgumentParser()
        a.add_argument("--need-cuda", action="store_true")
        a.add_argument("--gpus", type=int, default=0)
        ns = a.parse_args(rest)
        return cmd_env(ns.need_cuda, ns.gpus)
    if cmd == "plan":
        a = argparse.ArgumentParser()
        a.add_argument("--family", choices=sorted(FAMILY_MODEL), required=True)
        a.add_argument("--run-dir", required=True)
        a.add_argument("--dry-run", action="store_true")
        a.add_argument("--inputs-only", action="store_true", help="only check the inputs (stdlib, sub-second)")
        a.add_argument("--env-check", action="store_true", help="check this node's environment first")
        a.add_argument("--need-cuda", action="store_true")
        a.add_argument("--gpus", type=int, default=0)
        a.add_argument("overrides", nargs="*")
        ns = a.parse_args(rest)
        if ns.inputs_only:
            errors = check_inputs(ns.family, ns.overrides)
            for e in errors:
                say(f"[check] error: {e}", sys.stderr)
            return 2 if errors else 0
        if ns.env_check and cmd_env(ns.need_cuda, ns.gpus) != 0:
            return 3
        try:
            plan = build_plan(ns.family, ns.run_dir, ns.overrides, ns.dry_run, dict(os.environ), ns.inputs_only)
        except SystemExit:
            raise
        except Exception as e:  # a Hydra composition error names the override
            say(f"[check] error: {type(e).__name__}: {e}", sys.stderr)
            return 2
        if plan["errors"] and not ns.dry_run:
            for e in plan["errors"]:
                say(f"[check] error: {e}", sys.stderr)
            return 2
        print_plan(plan, ns.dry_run)
        if not ns.dry_run:
            write_plan(plan)
        return 0
    if cmd in ("intro", "outro", "state", "mark") and len(rest) == 2:
        return {"intro": cmd_intro, "outro": cmd_outro, "state": cmd_state, "mark": cmd_mark}[cmd](*rest)
    if cmd == "evaluate-fallback":
        return cmd_evaluate_fallback(rest[0], rest[1], rest[2], rest[3:])
    say(f"unknown command {cmd!r}\n{__doc__}", sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
