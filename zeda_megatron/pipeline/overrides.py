"""The Slurm job's arguments: Hydra overrides routed to the phases by prefix, the job's own settings and
its inputs (standard library only: the inputs are checked in the batch shell in a fraction of a second).

    model.* / parallel=... / seed=... / logging.* / optim.* / trainer.* / stage.* / data.*   both stages
    sft.<key>=V / opd.<key>=V        one stage only (e.g. sft.trainer.max_steps=10, opd.optim.lr=2e-6)
    generate.<key>=V  prepare.<key>=V  eval.<key>=V  convert.<key>=V  export.<key>=V   that phase's command
    data.prompts=FILE                the prompts JSONL (stage-1 generation and stage-2 sampling)
    data.responses=FILE              stage-1 prompt/response JSONL made elsewhere (skips generation)
    job.<key>=V                      the job itself (JOB_DEFAULTS)
"""

from __future__ import annotations

import os

FAMILY_MODEL = {"glm": "glm47_flash", "qwen": "qwen3_30b_a3b"}
FAMILY_CHECKPOINT = {"glm": "GLM-4.7-Flash", "qwen": "Qwen3-30B-A3B"}
PHASE_PREFIXES = {"sft": "sft", "stage1": "sft", "opd": "opd", "stage2": "opd", "generate": "generate",
                  "prepare": "prepare", "eval": "evaluate", "evaluate": "evaluate", "convert": "convert",
                  "export": "export", "job": "job"}
ROUTES = ("common", "sft", "opd", "generate", "prepare", "evaluate", "convert", "export")
WORK_PHASES = ("rehearse", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate")

JOB_DEFAULTS = {
    "run_dir": None,            # default runs/zeda-<family>-<SLURM_JOB_ID> (stable across requeues)
    "nodes": None,              # default: the allocation's (SLURM_JOB_NUM_NODES; 1 outside Slurm)
    "nproc_per_node": None,     # default: GPUs on the node (SLURM_GPUS_ON_NODE, else 8)
    "device": "cuda",           # cuda | cpu (cpu: no CUDA/TE check; tests and CPU-only trials)
    "phases": ",".join(WORK_PHASES),  # run these (in order); others are skipped
    "grace_s": 900,             # the signal lead time of #SBATCH --signal=B:USR1@N (keep them equal)
    "ckpt_write_gbps": 1.0,     # filesystem write speed per node, for the grace period check
    "progress_every_s": 300,    # how often the job log repeats a phase's last progress line
    "max_requeues": 50,         # stop requeueing after this many restarts
    "gpu": "h100",              # the GPU the time plan assumes (h100 | h200 | a100)
    "time_limit": None,         # a job run's --time for the time plan (default: the allocation's, else 24:00:00)
    "rdzv_port": None,          # default: derived from the job id
    "wandb_group": None,        # default: the run folder's name (all phases, both stages)
}
RDZV_PORT_BASE, RDZV_PORT_SPAN, RDZV_PORTS_PER_JOB = 20000, 2000, 16   # one port per phase, per job id


class OverrideError(ValueError):
    """An argument of the job that is not a valid override (the message names it)."""


def split_overrides(overrides: list[str]) -> dict:
    """Route the job's Hydra overrides: ``{"phase": {route: [overrides]}, "job": settings, "inputs": ...}``."""
    out = {k: [] for k in ROUTES}
    job, inputs = dict(JOB_DEFAULTS), {"prompts": None, "responses": None}
    for ov in overrides:
        if "=" not in ov:
            raise OverrideError(f"{ov!r} is not a Hydra override (key=value)")
        key, value = ov.split("=", 1)
        bare = key.lstrip("+~")
        head, _, rest = bare.partition(".")
        if bare in ("data.prompts", "data.responses"):
            inputs[bare.split(".")[1]] = value or None
        elif head in PHASE_PREFIXES and rest:
            phase = PHASE_PREFIXES[head]
            if phase == "job":
                if rest not in JOB_DEFAULTS:
                    raise OverrideError(f"job.{rest} is unknown; job keys: {sorted(JOB_DEFAULTS)}")
                job[rest] = value
            else:
                out[phase].append(key[: len(key) - len(bare)] + rest + "=" + value)
        else:
            out["common"].append(ov)
    return {"phase": out, "job": job, "inputs": inputs}


def has_key(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def value_of(overrides: list[str], key: str, default):
    """The last value ``overrides`` give ``key`` (Hydra's rule), else ``default``."""
    for o in reversed(overrides):
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return default


def unless(defaults: list[str], given: list[str]) -> list[str]:
    """The defaults whose key ``given`` does not set."""
    return [o for o in defaults if not has_key(given, o.split("=", 1)[0])]


def cli_args(overrides: list[str]) -> list[str]:
    """convert.dtype=float32 -> --dtype float32 (argparse tools)."""
    out = []
    for ov in overrides:
        k, v = ov.split("=", 1)
        flag = "--" + k.replace("_", "-")
        out += [flag] if v.lower() == "true" else ([] if v.lower() == "false" else [flag, v])
    return out


def count_lines(path: str | None) -> int | None:
    """Non-empty lines of a JSONL file (None when there is no such file)."""
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def settings(family: str, overrides: list[str], env: dict) -> dict:
    """The job's own settings (job.<key>, with the defaults that depend on the allocation)."""
    job = split_overrides(overrides)["job"]
    run_dir = job["run_dir"] or os.path.join("runs", f"zeda-{family}-{env.get('SLURM_JOB_ID') or 'local'}")
    job_id = env.get("SLURM_JOB_ID")
    rdzv = job["rdzv_port"] or RDZV_PORT_BASE + (int(job_id) if job_id and job_id.isdigit() else os.getpid()) \
        % RDZV_PORT_SPAN * RDZV_PORTS_PER_JOB
    # the allocation's node count: SLURM_JOB_NUM_NODES (an srun step's own SLURM_NNODES may be smaller)
    nodes = job["nodes"] or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1
    return {**job, "run_dir": os.path.abspath(run_dir), "nodes": int(nodes),
            "nproc_per_node": int(job["nproc_per_node"] or env.get("SLURM_GPUS_ON_NODE") or 8),
            "rdzv_port": int(rdzv), "grace_s": float(job["grace_s"]), "max_requeues": int(job["max_requeues"]),
            "progress_every_s": int(float(job["progress_every_s"])), "ckpt_write_gbps": float(job["ckpt_write_gbps"])}


def input_errors(family: str, hf_dir: str | None, prompts: str | None, responses: str | None) -> list[str]:
    """What is wrong with the job's inputs, each naming the override that fixes it."""
    errors = []
    if not hf_dir or hf_dir in ("null", "???"):
        errors.append(f"model.hf_dir is not set: add model.hf_dir=/path/to/{FAMILY_CHECKPOINT[family]} "
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


def check_inputs(family: str, overrides: list[str]) -> list[str]:
    """The job's inputs, from the overrides alone: model.hf_dir, data.prompts (and data.responses)."""
    routed = split_overrides(overrides)
    hf_dir = value_of(routed["phase"]["common"], "model.hf_dir", None)
    return input_errors(family, hf_dir, routed["inputs"]["prompts"], routed["inputs"]["responses"])
