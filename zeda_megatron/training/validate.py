"""Check a composed training config before any process group or model exists.

:func:`validate_config` raises :class:`ConfigError` (a ``ValueError``) whose message starts with the
offending key and says how to fix it; it returns the derived layout (:class:`RunPlan`) the trainer
needs anyway (data-parallel size, micro-batches per step, E, Z, the null target share, the HF config
in force).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from zeda_megatron.layout import LayoutError, check_layout
from zeda_megatron.layout import num_experts_of as num_experts_of
from zeda_megatron.routing import num_null_from_ratio, target_null_share

log = logging.getLogger(__name__)

STAGES = ("sft", "opd")
KL_TYPES = ("exact", "sampled")
PRECISIONS = ("auto", "bf16", "fp32")
RECOMPUTE = (False, True, "full", "selective", "none")
SCHEDULES = ("cosine", "constant")
WANDB_MODES = ("online", "offline", "disabled")
DATA_FORMATS = ("auto", "prompt_response", "text", "prompt")
FAMILIES = ("qwen3_moe", "glm4_moe_lite", "qwen3_moe_plus_plus", "glm4_moe_lite_plus_plus")
# fields of model.hf_config that must agree with hf_dir/config.json when both are given
STRUCTURAL_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
)


class ConfigError(ValueError):
    """A config value the trainer cannot run with; the message names the key and the fix."""


@dataclass
class RunPlan:
    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    num_microbatches: int
    hf_config: dict
    num_experts: int
    num_null_experts: int
    null_target_share: float
    teacher_source: str  # "hf_dir" or "random_init"
    notes: list = field(default_factory=list)


def _get(cfg, path: str, default=None):
    """Dotted lookup that turns an unset mandatory value (???) into a ConfigError naming the key."""
    node = cfg
    for part in path.split("."):
        if node is None:
            return default
        try:
            node = node[part] if isinstance(node, Mapping) or hasattr(node, "__getitem__") else getattr(node, part)
        except Exception as e:  # omegaconf MissingMandatoryValue / InterpolationResolutionError / KeyError
            if type(e).__name__ == "MissingMandatoryValue":
                raise ConfigError(f"{path} is not set (???); set it on the command line, e.g. {path}=...") from e
            if isinstance(e, (KeyError, AttributeError, IndexError, TypeError)):
                return default
            raise ConfigError(f"{path}: {e}") from e
    return node


def _int(cfg, path, minimum=None, default=None):
    v = _get(cfg, path, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{path}={v!r} must be an integer")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{path}={v} must be >= {minimum}")
    return v


def _num(cfg, path, lo=None, hi=None, lo_open=False, default=None):
    v = _get(cfg, path, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{path}={v!r} must be a number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{path}={v} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise ConfigError(f"{path}={v} must be <= {hi}")
    return float(v)


def _choice(cfg, path, choices, hint=""):
    v = _get(cfg, path)
    if v not in choices:
        raise ConfigError(f"{path}={v!r} is unknown; use one of {list(choices)}{hint}")
    return v


def _to_dict(x) -> dict:
    if x is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(x)


def _model_hf_config(cfg) -> tuple[dict, str]:
    hf_dir = _get(cfg, "model.hf_dir")
    hf_config = _to_dict(_get(cfg, "model.hf_config"))
    if hf_dir:
        path = os.path.join(str(hf_dir), "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"model.hf_dir={hf_dir!r} has no config.json; point it at a Hugging Face checkpoint folder "
                "(the original model: the teacher and the student's start)"
            )
        with open(path) as f:
            disk = json.load(f)
        for key in STRUCTURAL_KEYS:
            if key in hf_config and key in disk and hf_config[key] != disk[key]:
                raise ConfigError(
                    f"model.hf_config.{key}={hf_config[key]!r} but {path} says {disk[key]!r}: wrong model for "
                    f"model={_get(cfg, 'model.name')}? Pick the matching model config, or set model.hf_config=null"
                )
        return disk, "hf_dir"
    if not hf_config:
        stage = _get(cfg, "stage.name")
        what = "stage=opd needs a teacher" if stage == "opd" else "the trainer needs a model"
        raise ConfigError(
            f"model.hf_dir and model.hf_config are both null: {what}. Set model.hf_dir=<HF checkpoint of the "
            "original model> (or model.hf_config for a random-init test model)"
        )
    return hf_config, "random_init"


def validate_config(cfg, world_size: int, check_data: bool = True) -> RunPlan:
    """Fail fast, naming the key, for everything that would otherwise fail (or silently misbehave)
    once the job is running. ``check_data`` also reads the data files through (no tokenising)."""
    notes = []
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")

    # ---- logging / cluster -----------------------------------------------------------------------------
    _choice(cfg, "logging.wandb.mode", WANDB_MODES)
    if _get(cfg, "cluster.name") == "slurm":
        nodes, gpn = _get(cfg, "cluster.nodes"), _get(cfg, "cluster.gpus_per_node")
        if isinstance(nodes, int) and isinstance(gpn, int) and nodes * gpn != world_size:
            raise ConfigError(
                f"cluster.nodes*cluster.gpus_per_node = {nodes}*{gpn} = {nodes * gpn} but the job has "
                f"{world_size} processes; fix the cluster settings or the launch"
            )

    # ---- stage -------------------------------------------------------------------------------------
    stage = _choice(cfg, "stage.name", STAGES, " (stage=sft for stage 1, stage=opd for stage 2)")
    kl = _choice(cfg, "stage.kl", KL_TYPES, " (exact: full vocabulary; sampled: the on-policy estimator)")
    nll_w = _num(cfg, "stage.nll_weight", lo=0)
    kl_w = _num(cfg, "stage.kl_weight", lo=0)
    if nll_w == 0 and kl_w == 0:
        raise ConfigError("stage.nll_weight and stage.kl_weight are both 0: nothing to train; set one > 0")
    if stage == "opd" and kl_w == 0:
        raise ConfigError("stage.kl_weight=0 with stage=opd: on-policy distillation needs the KL term; set it > 0")
    if stage == "sft" and kl == "sampled" and kl_w > 0:
        raise ConfigError(
            "stage.kl=sampled is the on-policy estimator on the student's own samples (stage=opd); "
            "with stage=sft use stage.kl=exact"
        )
    _num(cfg, "stage.temperature", lo=0, lo_open=True)
    max_new = _int(cfg, "stage.max_new_tokens", minimum=1)
    spp = _int(cfg, "stage.samples_per_prompt", minimum=1)
    top_p = _get(cfg, "stage.top_p", 1.0)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"stage.top_p={top_p!r} must be a number in (0, 1] (1: no nucleus cut)")
    if str(_get(cfg, "stage.offload_while_sampling", "auto")).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"stage.offload_while_sampling={_get(cfg, 'stage.offload_while_sampling')!r}: "
                          "use auto (on GPUs), true or false")

    # ---- trainer -------------------------------------------------------------------------------------
    max_steps = _int(cfg, "trainer.max_steps", minimum=1)
    mbs = _int(cfg, "trainer.micro_batch_size", minimum=1)
    gbs = _int(cfg, "trainer.global_batch_size", minimum=1)
    seq = _int(cfg, "trainer.seq_length", minimum=2)
    _int(cfg, "trainer.log_interval", minimum=1)
    _int(cfg, "trainer.save_interval", minimum=0)
    _int(cfg, "trainer.keep_checkpoints", minimum=0, default=0)  # 0: keep every checkpoint
    if _get(cfg, "trainer.eval_interval") is not None:
        _int(cfg, "trainer.eval_interval", minimum=0)
    _choice(cfg, "trainer.precision", PRECISIONS, " (auto: bf16 on GPU, fp32 on CPU)")
    if _get(cfg, "trainer.recompute") not in RECOMPUTE:
        raise ConfigError(f"trainer.recompute={_get(cfg, 'trainer.recompute')!r} is unknown; use false, true/full or selective")
    resume = _get(cfg, "trainer.resume")
    if resume not in ("auto", "never") and (not isinstance(resume, str) or not os.path.exists(resume)):
        raise ConfigError(
            f"trainer.resume={resume!r}: not auto/never and no such checkpoint path; use auto, never or an "
            "existing checkpoint folder"
        )
    if not _get(cfg, "trainer.save_dir"):
        raise ConfigError("trainer.save_dir is empty; set a folder for checkpoints")
    if stage == "opd" and max_new >= seq:
        raise ConfigError(
            f"stage.max_new_tokens={max_new} must be < trainer.seq_length={seq} (prompt and response share "
            "the sequence); lower max_new_tokens or raise seq_length"
        )
    if stage == "opd" and mbs % spp:
        raise ConfigError(
            f"stage.samples_per_prompt={spp} must divide trainer.micro_batch_size={mbs} (all samples of a "
            "prompt go in one micro-batch)"
        )

    # ---- model -------------------------------------------------------------------------------------
    hf, source = _model_hf_config(cfg)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"model.hf_config.model_type={model_type!r} is not supported; use one of {list(FAMILIES[:2])}")
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_experts_per_tok"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ConfigError(f"model.hf_config.{key}={hf.get(key)!r} must be a positive integer")
    n_exp = num_experts_of(hf)
    if not n_exp:
        key = "n_routed_experts" if model_type.startswith("glm") else "num_experts"
        raise ConfigError(f"model.hf_config.{key} is missing: the model has no routed experts")
    topk = int(hf["num_experts_per_tok"])
    if source == "random_init" and int(hf["vocab_size"]) < 260:
        raise ConfigError(
            f"model.hf_config.vocab_size={hf['vocab_size']} is too small for the built-in byte tokenizer "
            "(needs >= 260); raise it or set model.hf_dir"
        )
    if seq > int(hf.get("max_position_embeddings", seq)):
        raise ConfigError(
            f"trainer.seq_length={seq} exceeds model.hf_config.max_position_embeddings={hf['max_position_embeddings']}"
        )
    init_ckpt = _get(cfg, "model.init_checkpoint")
    if init_ckpt and not os.path.exists(str(init_ckpt)):
        raise ConfigError(f"model.init_checkpoint={init_ckpt!r} does not exist; give the stage 1 checkpoint folder")
    if stage == "opd" and not init_ckpt:
        notes.append("stage=opd without model.init_checkpoint: the student starts from the original model "
                     "(OPD only, no stage 1)")

    # null experts
    num = _get(cfg, "model.null_experts.num")
    ratio = _get(cfg, "model.null_experts.ratio")
    if (num is None) == (ratio is None):
        raise ConfigError(
            "model.null_experts: set exactly one of num (Z) or ratio (Z/E); got "
            f"num={num!r}, ratio={ratio!r} (e.g. model.null_experts.num=null model.null_experts.ratio=0.5)"
        )
    if num is not None:
        z = _int(cfg, "model.null_experts.num", minimum=0)
    else:
        _num(cfg, "model.null_experts.ratio", lo=0)
        try:
            z = num_null_from_ratio(n_exp, float(ratio))
        except ValueError as e:
            raise ConfigError(
                f"model.null_experts.ratio={ratio}: {e}; pick a ratio with ratio*E whole, or set model.null_experts.num"
            ) from e
    weight = _num(cfg, "model.null_experts.weight", lo=0, lo_open=True)
    _num(cfg, "model.group_loss_coeff", lo=0)
    if z == 0:
        notes.append("model.null_experts gives Z=0: the student has no null experts")
    if topk > n_exp + z:
        raise ConfigError(f"num_experts_per_tok={topk} exceeds E+Z={n_exp}+{z}; add null experts")
    if _get(cfg, "model.null_experts.mask", False) and topk > n_exp:
        raise ConfigError(f"model.null_experts.mask=true needs num_experts_per_tok={topk} <= E={n_exp}")
    n_group = int(hf.get("n_group") or 1)
    if n_group > 1 and (n_exp + z) % n_group:
        raise ConfigError(
            f"model.null_experts: E+Z={n_exp}+{z} is not divisible by the router's n_group={n_group}; "
            "choose Z so that n_group divides E+Z"
        )
    share = target_null_share(n_exp, z, weight) if z else 0.0

    # ---- parallel layout ---------------------------------------------------------------------------
    tp = _int(cfg, "parallel.tp", minimum=1)
    pp = _int(cfg, "parallel.pp", minimum=1)
    ep = _int(cfg, "parallel.ep", minimum=1)
    etp = _get(cfg, "parallel.etp")
    etp = tp if etp is None else _int(cfg, "parallel.etp", minimum=1)
    sp = bool(_get(cfg, "parallel.sequence_parallel", False))
    try:  # the layout's rules live in one place (zeda_megatron.layout)
        check_layout(tp=tp, pp=pp, ep=ep, etp=etp, sequence_parallel=sp, world_size=world_size, hf_config=hf)
    except LayoutError as e:
        raise ConfigError(str(e)) from e
    check_engine_config(cfg, tp=tp, pp=pp, ep=ep, sequence_parallel=sp)  # engine=megatron|deepspeed
    if (stage == "opd" and pp > 1 and bool(_get(cfg, "stage.router_replay", False))
            and str(_get(cfg, "trainer.recompute")).lower() in ("true", "full")):
        # megatron-core's REPLAY_FORWARD replays the most recently set indices; under 1F1B the recompute
        # of micro-batch m runs after later micro-batches' forwards and would replay their routing
        raise ConfigError(
            "trainer.recompute=full with stage.router_replay=true and parallel.pp>1 would replay another "
            "micro-batch's routing in the recomputed forward; use trainer.recompute=selective, "
            "parallel.pp=1, or stage.router_replay=false"
        )
    dp = world_size // (tp * pp)
    if gbs % (mbs * dp):
        raise ConfigError(
            f"trainer.global_batch_size={gbs} is not divisible by micro_batch_size*dp = {mbs}*{dp} = {mbs * dp}; "
            f"use a multiple of {mbs * dp}"
        )
    nmb = gbs // (mbs * dp)
    if stage == "opd" and gbs % spp:
        raise ConfigError(f"trainer.global_batch_size={gbs} must be a multiple of stage.samples_per_prompt={spp}")

    # ---- optimiser -----------------------------------------------------------------------------------
    lr = _num(cfg, "optim.lr", lo=0, lo_open=True)
    min_lr = _num(cfg, "optim.min_lr", lo=0)
    if min_lr > lr:
        raise ConfigError(f"optim.min_lr={min_lr} is above optim.lr={lr}")
    _num(cfg, "optim.weight_decay", lo=0)
    for key in ("optim.adam_beta1", "optim.adam_beta2"):
        v = _num(cfg, key, lo=0)
        if v >= 1:
            raise ConfigError(f"{key}={v} must be < 1")
    _num(cfg, "optim.clip_grad", lo=0)
    _choice(cfg, "optim.schedule", SCHEDULES)
    wf = _num(cfg, "optim.warmup_fraction", lo=0)
    if wf >= 1:
        raise ConfigError(f"optim.warmup_fraction={wf} must be < 1 (a fraction of trainer.max_steps)")

    from zeda_megatron.plan import check_config as check_mcore_and_memory  # model.mcore + the memory plan
    check_mcore_and_memory(cfg, world_size, error=ConfigError)

    # ---- data ----------------------------------------------------------------------------------------
    fmt = _choice(cfg, "data.format", DATA_FORMATS)
    path = _get(cfg, "data.path")
    if path is None:
        if source == "hf_dir":
            raise ConfigError(
                f"data.path is not set: stage={stage} of a real model needs data "
                + ("(JSONL prompt/response or text lines)" if stage == "sft" else "(JSONL prompt lines)")
                + "; the built-in synthetic corpus is only for random-init test models"
            )
        notes.append("data.path is null: training on the built-in synthetic corpus")
    else:
        if not _data_exists(path):
            raise ConfigError(f"data.path={path!r} does not exist (a JSONL file or a prepared prefix)")
        if check_data:
            _check_file("data.path", str(path), fmt, stage)
    eval_path = _get(cfg, "data.eval_path")
    if eval_path is not None:
        if not _data_exists(eval_path):
            raise ConfigError(f"data.eval_path={eval_path!r} does not exist (a JSONL file or a prepared prefix)")
        if check_data:
            _check_file("data.eval_path", str(eval_path), fmt, stage)

    for note in notes:
        log.info("config: %s", note)
    return RunPlan(
        world_size=world_size, tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, num_microbatches=nmb, hf_config=hf,
        num_experts=n_exp, num_null_experts=z, null_target_share=share, teacher_source=source, notes=notes,
    )


def check_engine_config(cfg, *, tp: int, pp: int, ep: int, sequence_parallel: bool) -> str:
    """The ``engine`` group (conf/engine): engine=megatron or engine=deepspeed, and the layouts and
    optimizer settings each can take (rules in :func:`zeda_megatron.layout.check_engine`)."""
    from zeda_megatron.layout import check_engine

    name = _get(cfg, "engine.name", "megatron")
    ds = name == "deepspeed"
    try:
        check_engine(engine=name, zero_stage=_get(cfg, "engine.zero_stage") if ds else None,
                     offload_optimizer=bool(_get(cfg, "engine.offload_optimizer", False)),
                     offload_param=bool(_get(cfg, "engine.offload_param", False)),
                     tp=tp, pp=pp, ep=ep, sequence_parallel=sequence_parallel)
    except LayoutError as e:
        raise ConfigError(str(e)) from e
    if ds:
        if _get(cfg, "optim.use_distributed_optimizer") is True:
            raise ConfigError("optim.use_distributed_optimizer=true is megatron-core's; under engine=deepspeed "
                              "ZeRO partitions the optimizer (engine.zero_stage): leave it auto/false")
        if _get(cfg, "optim.optimizer_cpu_offload", False):
            raise ConfigError("optim.optimizer_cpu_offload=true is megatron-core's offload; under engine=deepspeed "
                              "use engine.offload_optimizer=true")
        extra = _get(cfg, "engine.config")
        if extra is not None and not isinstance(extra, Mapping):
            raise ConfigError(f"engine.config={extra!r} must be a mapping (merged into DeepSpeed's config)")
    return name


def _data_exists(path) -> bool:
    from zeda_megatron.training.data import data_source_exists

    return data_source_exists(path)


def _check_file(key: str, path: str, fmt: str, stage: str) -> None:
    from zeda_megatron.training.data import check_data_file

    try:
        check_data_file(path, fmt, stage)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e
