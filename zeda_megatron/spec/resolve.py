"""Resolve a composed config into a :class:`~zeda_megatron.spec.types.RunSpec`, checking every value.

:func:`resolve` is the one place a config is validated: each error is a :class:`ConfigError` whose
message starts with the offending key and says how to fix it, raised before any process group, weight
or file is touched. What needs more than the config is checked by its owner on the resolved spec: the
memory fit (``zeda_megatron.plan.check_fits``) and the data files' contents
(``zeda_megatron.training.validate``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

from zeda_megatron.layout import LayoutError, check_engine, check_layout, num_experts_of
from zeda_megatron.routing import num_null_from_ratio, target_null_share
from zeda_megatron.spec.lookup import ConfigError, choice, container, flag, get, integer, is_missing, number
from zeda_megatron.spec.types import (
    GB, DataSpec, EngineSpec, LayoutSpec, ModelSpec, NullSpec, OptimSpec, RunSpec, StageSpec, TrainerSpec,
)

STAGES = ("sft", "opd")
KL_TYPES = ("exact", "sampled")
PRECISIONS = ("auto", "bf16", "fp32")
RECOMPUTE = {False: None, "false": None, "none": None, True: "full", "true": "full", "full": "full",
             "selective": "selective"}
SCHEDULES = ("cosine", "constant")
WANDB_MODES = ("online", "offline", "disabled")
DATA_FORMATS = ("auto", "prompt_response", "text", "prompt")
FAMILIES = ("qwen3_moe", "glm4_moe_lite", "qwen3_moe_plus_plus", "glm4_moe_lite_plus_plus")
AUTO_TRUE_FALSE = ("auto", "true", "false")
MIN_BYTE_TOKENIZER_VOCAB = 260  # 256 bytes + the built-in tokenizer's specials
# fields of model.hf_config that must agree with hf_dir/config.json when both are given
STRUCTURAL_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
)


def resolve(cfg, world: int | None = None, *, inputs: bool = True, on_gpu: bool | None = None,
            gpu_gb: float | None = None) -> RunSpec:
    """The run ``cfg`` describes, checked and resolved.

    world: the number of processes (None: ``parallel.gpus``, else the smallest world the layout needs).
    inputs: check the run's inputs (train, generate): ``model.hf_dir`` set, data, checkpoints and
        resume paths exist. False for what needs only shapes (the plan, the rehearsal, tests that build
        an engine by hand): ``model.hf_dir`` may then be unset (???) and nothing on disk is looked at.
    on_gpu: the run trains on GPUs (default: this machine has CUDA). The plan and the rehearsal
        describe the GPU run from a CPU machine.
    gpu_gb: the GPU size to plan against in GB (default: ``parallel.gpu_memory_gb``).
    """
    if on_gpu is None:
        from zeda_megatron.platform import on_cpu

        on_gpu = not on_cpu()
    notes: list[str] = []
    logging = _logging(cfg)
    stage_name = choice(cfg, "stage.name", STAGES, " (stage=sft for stage 1, stage=opd for stage 2)")
    model = _model(cfg, stage_name, inputs, notes)
    layout = _layout(cfg, world, model, gpu_gb, on_gpu)
    cluster = _cluster(cfg, layout.world)
    engine = _engine(cfg, layout)
    stage = _stage(cfg, stage_name, engine, on_gpu)
    trainer = _trainer(cfg, stage, model, layout, inputs, on_gpu)
    optim = _optim(cfg, engine, on_gpu)
    data = _data(cfg, model, stage, inputs, notes)
    _check_pipeline_replay(stage, layout, trainer)
    _check_mcore(model, layout, trainer)
    run_dir = _optional_str(cfg, "run_dir")
    return RunSpec(model=model, layout=layout, stage=stage, trainer=trainer, optim=optim, engine=engine, data=data,
                   seed=integer(cfg, "seed", default=0), run_dir=run_dir, on_gpu=on_gpu, logging=logging,
                   cluster=cluster, notes=tuple(notes))


# ---- groups ---------------------------------------------------------------------------------------------
def _logging(cfg) -> dict:
    choice(cfg, "logging.wandb.mode", WANDB_MODES)
    return container(get(cfg, "logging"))


def _cluster(cfg, world: int) -> dict:
    if get(cfg, "cluster.name") == "slurm":
        nodes, gpn = get(cfg, "cluster.nodes"), get(cfg, "cluster.gpus_per_node")
        if isinstance(nodes, int) and isinstance(gpn, int) and nodes * gpn != world:
            raise ConfigError(
                f"cluster.nodes*cluster.gpus_per_node = {nodes}*{gpn} = {nodes * gpn} but the job has "
                f"{world} processes; fix the cluster settings or the launch"
            )
    return container(get(cfg, "cluster"))


def _stage(cfg, name: str, engine: EngineSpec, on_gpu: bool) -> StageSpec:
    kl = choice(cfg, "stage.kl", KL_TYPES, " (exact: full vocabulary; sampled: the on-policy estimator)")
    nll_w = number(cfg, "stage.nll_weight", lo=0)
    kl_w = number(cfg, "stage.kl_weight", lo=0)
    if nll_w == 0 and kl_w == 0:
        raise ConfigError("stage.nll_weight and stage.kl_weight are both 0: nothing to train; set one > 0")
    if name == "opd" and kl_w == 0:
        raise ConfigError("stage.kl_weight=0 with stage=opd: on-policy distillation needs the KL term; set it > 0")
    if name == "sft" and kl == "sampled" and kl_w > 0:
        raise ConfigError(
            "stage.kl=sampled is the on-policy estimator on the student's own samples (stage=opd); "
            "with stage=sft use stage.kl=exact"
        )
    temperature = number(cfg, "stage.temperature", lo=0, lo_open=True)
    top_p = get(cfg, "stage.top_p", 1.0)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"stage.top_p={top_p!r} must be a number in (0, 1] (1: no nucleus cut)")
    offload = str(get(cfg, "stage.offload_while_sampling", "auto")).lower()
    if offload not in AUTO_TRUE_FALSE:
        raise ConfigError(f"stage.offload_while_sampling={get(cfg, 'stage.offload_while_sampling')!r}: "
                          "use auto (on GPUs), true or false")
    sampling = name == "opd"
    return StageSpec(
        name=name, nll_weight=nll_w, kl_weight=kl_w, kl=kl, temperature=temperature,
        max_new_tokens=integer(cfg, "stage.max_new_tokens", minimum=1),
        samples_per_prompt=integer(cfg, "stage.samples_per_prompt", minimum=1), top_p=float(top_p),
        # the megatron engine's grad buffers and optimizer state; DeepSpeed keeps its own
        offload_while_sampling=sampling and not engine.deepspeed and (
            offload == "true" or (offload == "auto" and on_gpu)),
        router_replay=bool(get(cfg, "stage.router_replay", False)),
        fused_loss=bool(get(cfg, "stage.fused_loss", False)),
    )


def _trainer(cfg, stage: StageSpec, model: ModelSpec, layout: LayoutSpec, inputs: bool, on_gpu: bool) -> TrainerSpec:
    max_steps = integer(cfg, "trainer.max_steps", minimum=1)
    mbs = integer(cfg, "trainer.micro_batch_size", minimum=1)
    gbs = integer(cfg, "trainer.global_batch_size", minimum=1)
    seq = integer(cfg, "trainer.seq_length", minimum=2)
    save_interval = integer(cfg, "trainer.save_interval", minimum=0)
    keep = integer(cfg, "trainer.keep_checkpoints", minimum=0, default=0)  # 0: keep every checkpoint
    precision = choice(cfg, "trainer.precision", PRECISIONS, " (auto: bf16 on GPU, fp32 on CPU)")
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    rec = get(cfg, "trainer.recompute")
    key = rec.lower() if isinstance(rec, str) else rec
    if key not in RECOMPUTE:
        raise ConfigError(f"trainer.recompute={rec!r} is unknown; use false, true/full or selective")
    resume = get(cfg, "trainer.resume", "auto")
    if inputs and resume not in ("auto", "never") and (not isinstance(resume, str) or not os.path.exists(resume)):
        raise ConfigError(
            f"trainer.resume={resume!r}: not auto/never and no such checkpoint path; use auto, never or an "
            "existing checkpoint folder"
        )
    save_dir = _optional_str(cfg, "trainer.save_dir")
    if inputs and not save_dir:
        raise ConfigError("trainer.save_dir is empty; set a folder for checkpoints")
    if stage.needs_sampling and stage.max_new_tokens >= seq:
        raise ConfigError(
            f"stage.max_new_tokens={stage.max_new_tokens} must be < trainer.seq_length={seq} (prompt and response "
            "share the sequence); lower max_new_tokens or raise seq_length"
        )
    if stage.needs_sampling and mbs % stage.samples_per_prompt:
        raise ConfigError(
            f"stage.samples_per_prompt={stage.samples_per_prompt} must divide trainer.micro_batch_size={mbs} (all "
            "samples of a prompt go in one micro-batch)"
        )
    max_pos = model.hf_config.get("max_position_embeddings", seq)
    if seq > int(max_pos):
        raise ConfigError(f"trainer.seq_length={seq} exceeds model.hf_config.max_position_embeddings={max_pos}")
    if gbs % (mbs * layout.dp):
        raise ConfigError(
            f"trainer.global_batch_size={gbs} is not divisible by micro_batch_size*dp = {mbs}*{layout.dp} = "
            f"{mbs * layout.dp}; use a multiple of {mbs * layout.dp}"
        )
    if stage.needs_sampling and gbs % stage.samples_per_prompt:
        raise ConfigError(f"trainer.global_batch_size={gbs} must be a multiple of "
                          f"stage.samples_per_prompt={stage.samples_per_prompt}")
    return TrainerSpec(
        max_steps=max_steps, micro_batch_size=mbs, global_batch_size=gbs, seq_length=seq,
        num_microbatches=gbs // (mbs * layout.dp), save_interval=save_interval, keep_checkpoints=keep,
        save_dir=save_dir, resume=str(resume), recompute=RECOMPUTE[key], precision=precision,
        verify_teacher=bool(get(cfg, "trainer.verify_teacher", False)),
    )


def _model(cfg, stage: str, inputs: bool, notes: list) -> ModelSpec:
    hf, source, hf_dir = _hf_config(cfg, stage, inputs)
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
    if source == "random_init" and int(hf["vocab_size"]) < MIN_BYTE_TOKENIZER_VOCAB:
        raise ConfigError(
            f"model.hf_config.vocab_size={hf['vocab_size']} is too small for the built-in byte tokenizer "
            f"(needs >= {MIN_BYTE_TOKENIZER_VOCAB}); raise it or set model.hf_dir"
        )
    init_ckpt = get(cfg, "model.init_checkpoint")
    if inputs and init_ckpt and not os.path.exists(str(init_ckpt)):
        raise ConfigError(f"model.init_checkpoint={init_ckpt!r} does not exist; give the stage 1 checkpoint folder")
    if stage == "opd" and not init_ckpt:
        notes.append("stage=opd without model.init_checkpoint: the student starts from the original model "
                     "(OPD only, no stage 1)")
    null = _null(cfg, hf, n_exp, topk, notes)
    number(cfg, "model.group_loss_coeff", lo=0)
    from zeda_megatron.bridge.hf_config import BridgeError, check_mcore_settings, model_info

    try:
        family = model_info(hf).family
        mcore = check_mcore_settings(get(cfg, "model.mcore"), family=family)
    except BridgeError as e:
        raise ConfigError(str(e)) from e
    return ModelSpec(
        name=str(get(cfg, "model.name", "")), hf_dir=hf_dir, hf_config=hf, source=source, family=family,
        num_experts=n_exp, topk=topk, null=null, group_loss_coeff=float(get(cfg, "model.group_loss_coeff")),
        init_checkpoint=str(init_ckpt) if init_ckpt else None, mcore=mcore or {},
        chat_template=bool(get(cfg, "model.chat_template", False)),
    )


def _hf_config(cfg, stage: str, inputs: bool) -> tuple[dict, str, str | None]:
    """(HF config in force, source, hf_dir): hf_dir/config.json when model.hf_dir is set (checked against
    the structural keys of model.hf_config), else model.hf_config."""
    if not inputs and is_missing(cfg, "model.hf_dir"):
        hf_dir = None  # the released presets' ??? : their shapes are in model.hf_config
    else:
        hf_dir = get(cfg, "model.hf_dir")
    hf_config = container(get(cfg, "model.hf_config"))
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
                    f"model={get(cfg, 'model.name')}? Pick the matching model config, or set model.hf_config=null"
                )
        return disk, "hf_dir", str(hf_dir)
    if not hf_config:
        what = "stage=opd needs a teacher" if stage == "opd" else "the trainer needs a model"
        raise ConfigError(
            f"model.hf_dir and model.hf_config are both null: {what}. Set model.hf_dir=<HF checkpoint of the "
            "original model> (or model.hf_config for a random-init test model)"
        )
    shapes_only = not inputs and is_missing(cfg, "model.hf_dir")
    return hf_config, "shapes" if shapes_only else "random_init", None


def _null(cfg, hf: dict, n_exp: int, topk: int, notes: list) -> NullSpec:
    num = get(cfg, "model.null_experts.num")
    ratio = get(cfg, "model.null_experts.ratio")
    if (num is None) == (ratio is None):
        raise ConfigError(
            "model.null_experts: set exactly one of num (Z) or ratio (Z/E); got "
            f"num={num!r}, ratio={ratio!r} (e.g. model.null_experts.num=null model.null_experts.ratio=0.5)"
        )
    if num is not None:
        z = integer(cfg, "model.null_experts.num", minimum=0)
    else:
        number(cfg, "model.null_experts.ratio", lo=0)
        try:
            z = num_null_from_ratio(n_exp, float(ratio))
        except ValueError as e:
            raise ConfigError(
                f"model.null_experts.ratio={ratio}: {e}; pick a ratio with ratio*E whole, or set model.null_experts.num"
            ) from e
    weight = number(cfg, "model.null_experts.weight", lo=0, lo_open=True)
    mask = bool(get(cfg, "model.null_experts.mask", False))
    if z == 0:
        notes.append("model.null_experts gives Z=0: the student has no null experts")
    if topk > n_exp + z:
        raise ConfigError(f"num_experts_per_tok={topk} exceeds E+Z={n_exp}+{z}; add null experts")
    if mask and topk > n_exp:
        raise ConfigError(f"model.null_experts.mask=true needs num_experts_per_tok={topk} <= E={n_exp}")
    n_group = int(hf.get("n_group") or 1)
    if n_group > 1 and (n_exp + z) % n_group:
        raise ConfigError(
            f"model.null_experts: E+Z={n_exp}+{z} is not divisible by the router's n_group={n_group}; "
            "choose Z so that n_group divides E+Z"
        )
    share = target_null_share(n_exp, z, weight) if z else 0.0
    return NullSpec(num=z, weight=weight, mask=mask, target_share=share)


def _layout(cfg, world, model: ModelSpec, gpu_gb, on_gpu: bool) -> LayoutSpec:
    tp = integer(cfg, "parallel.tp", minimum=1)
    pp = integer(cfg, "parallel.pp", minimum=1)
    ep = integer(cfg, "parallel.ep", minimum=1)
    etp = tp if get(cfg, "parallel.etp") is None else integer(cfg, "parallel.etp", minimum=1)
    sp = bool(get(cfg, "parallel.sequence_parallel", False))
    if world is None:
        world = get(cfg, "parallel.gpus")
    world = math.lcm(tp * pp, etp * ep * pp) if world is None else int(world)
    if world < 1:
        raise ConfigError(f"world size {world} must be >= 1")
    try:  # the layout's rules live in one place (zeda_megatron.layout)
        check_layout(tp=tp, pp=pp, ep=ep, etp=etp, sequence_parallel=sp, world_size=world, hf_config=model.hf_config)
    except LayoutError as e:
        raise ConfigError(str(e)) from e
    return LayoutSpec(world=world, tp=tp, pp=pp, ep=ep, etp=etp, sp=sp, dp=world // (tp * pp),
                      edp=world // (etp * ep * pp), gpu_memory_bytes=_gpu_memory_bytes(cfg, gpu_gb, on_gpu))


def _gpu_memory_bytes(cfg, gpu_gb, on_gpu: bool) -> int | None:
    """``gpu_gb`` (GB), else ``parallel.gpu_memory_gb``: a number, auto (this machine's GPU; none on CPU)
    or null (no memory check)."""
    v = gpu_gb if gpu_gb is not None else get(cfg, "parallel.gpu_memory_gb", "auto")
    if v in (None, False) or (isinstance(v, str) and v.lower() in ("null", "none", "off", "false")):
        return None
    if isinstance(v, str) and v.lower() == "auto":
        from zeda_megatron.platform import on_cpu

        if on_cpu():
            return None
        import torch

        # this process's own GPU (LOCAL_RANK): the check runs before torch.cuda.set_device
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        return int(torch.cuda.get_device_properties(index).total_memory)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"parallel.gpu_memory_gb={v!r}: use auto, a size in GB or null")
    try:
        return int(float(v) * GB)
    except ValueError as e:
        raise ConfigError(f"parallel.gpu_memory_gb={v!r}: use auto, a size in GB or null") from e


def _engine(cfg, layout: LayoutSpec) -> EngineSpec:
    """engine=megatron or engine=deepspeed (conf/engine) and the layouts each takes (zeda_megatron.layout)."""
    name = get(cfg, "engine.name", "megatron")
    ds = name == "deepspeed"
    zero = get(cfg, "engine.zero_stage") if ds else None
    offload_optimizer = bool(get(cfg, "engine.offload_optimizer", False))
    offload_param = bool(get(cfg, "engine.offload_param", False))
    try:
        check_engine(engine=name, zero_stage=zero, offload_optimizer=offload_optimizer, offload_param=offload_param,
                     tp=layout.tp, pp=layout.pp, ep=layout.ep, sequence_parallel=layout.sp)
    except LayoutError as e:
        raise ConfigError(str(e)) from e
    extra = get(cfg, "engine.config")
    if ds:
        if get(cfg, "optim.use_distributed_optimizer") is True:
            raise ConfigError("optim.use_distributed_optimizer=true is megatron-core's; under engine=deepspeed "
                              "ZeRO partitions the optimizer (engine.zero_stage): leave it auto/false")
        if get(cfg, "optim.optimizer_cpu_offload", False):
            raise ConfigError("optim.optimizer_cpu_offload=true is megatron-core's offload; under engine=deepspeed "
                              "use engine.offload_optimizer=true")
        if extra is not None and not isinstance(extra, Mapping):
            raise ConfigError(f"engine.config={extra!r} must be a mapping (merged into DeepSpeed's config)")
    return EngineSpec(name=name, zero_stage=int(zero) if ds else 0, offload_optimizer=ds and offload_optimizer,
                      offload_param=ds and offload_param, config=container(extra) if ds else {})


def _optim(cfg, engine: EngineSpec, on_gpu: bool) -> OptimSpec:
    lr = number(cfg, "optim.lr", lo=0)
    min_lr = number(cfg, "optim.min_lr", lo=0)
    if min_lr > lr:
        raise ConfigError(f"optim.min_lr={min_lr} is above optim.lr={lr}")
    betas = []
    for key in ("optim.adam_beta1", "optim.adam_beta2"):
        v = number(cfg, key, lo=0)
        if v >= 1:
            raise ConfigError(f"{key}={v} must be < 1")
        betas.append(v)
    schedule = choice(cfg, "optim.schedule", SCHEDULES)
    wf = number(cfg, "optim.warmup_fraction", lo=0)
    if wf >= 1:
        raise ConfigError(f"optim.warmup_fraction={wf} must be < 1 (a fraction of trainer.max_steps)")
    frac = get(cfg, "optim.optimizer_offload_fraction", 1.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= float(frac) <= 1.0:
        raise ConfigError(f"optim.optimizer_offload_fraction={frac!r} must be a number in [0, 1]")
    grad_fp32 = flag(cfg, "optim.grad_reduce_in_fp32", True)
    use_dist = get(cfg, "optim.use_distributed_optimizer", "auto")
    offload = not engine.deepspeed and bool(get(cfg, "optim.optimizer_cpu_offload", False))
    if offload and use_dist is False:
        raise ConfigError("optim.optimizer_cpu_offload=true needs the distributed optimizer (megatron-core runs the "
                          "offloaded step through its precision-aware path): set optim.use_distributed_optimizer=true/auto")
    # auto: on GPUs (megatron-core's distributed optimizer needs CUDA tensors; the build refuses it on CPU).
    # ZeRO partitions the optimizer under engine=deepspeed.
    dist_opt = False if engine.deepspeed else (on_gpu if use_dist in ("auto", None) else bool(use_dist))
    return OptimSpec(
        lr=lr, min_lr=min_lr, weight_decay=number(cfg, "optim.weight_decay", lo=0), adam_beta1=betas[0],
        adam_beta2=betas[1], adam_eps=number(cfg, "optim.adam_eps", lo=0, lo_open=True, default=1e-8),
        clip_grad=number(cfg, "optim.clip_grad", lo=0), schedule=schedule, warmup_fraction=wf,
        distributed_optimizer=dist_opt, grad_reduce_in_fp32=grad_fp32, cpu_offload=offload,
        offload_fraction=float(frac),
    )


def _data(cfg, model: ModelSpec, stage: StageSpec, inputs: bool, notes: list) -> DataSpec:
    fmt = choice(cfg, "data.format", DATA_FORMATS)
    path = get(cfg, "data.path")
    if inputs and path is None:
        if model.source == "hf_dir":
            raise ConfigError(
                f"data.path is not set: stage={stage.name} of a real model needs data "
                + ("(JSONL prompt/response or text lines)" if stage.name == "sft" else "(JSONL prompt lines)")
                + "; the built-in synthetic corpus is only for random-init test models"
            )
        notes.append("data.path is null: training on the built-in synthetic corpus")
    return DataSpec(path=str(path) if path is not None else None, format=fmt,
                    chat_template=bool(get(cfg, "data.chat_template", False)),
                    cache_dir=_optional_str(cfg, "data.cache_dir"), packing=bool(get(cfg, "data.packing", True)),
                    synthetic_samples=integer(cfg, "data.synthetic_samples", minimum=1, default=512))


# ---- cross-group rules ---------------------------------------------------------------------------------
def _check_pipeline_replay(stage: StageSpec, layout: LayoutSpec, trainer: TrainerSpec) -> None:
    if stage.router_replay and layout.pp > 1 and trainer.recompute == "full":
        # megatron-core's REPLAY_FORWARD replays the most recently set indices; under 1F1B the recompute
        # of micro-batch m runs after later micro-batches' forwards and would replay their routing
        raise ConfigError(
            "trainer.recompute=full with stage.router_replay=true and parallel.pp>1 would replay another "
            "micro-batch's routing in the recomputed forward; use trainer.recompute=selective, "
            "parallel.pp=1, or stage.router_replay=false"
        )


def _check_mcore(model: ModelSpec, layout: LayoutSpec, trainer: TrainerSpec) -> None:
    """With model.mcore settings, build (only) the TransformerConfig with them and the layout, so that
    megatron-core's own consistency checks fail now, not after the weights are loaded."""
    if not model.mcore:
        return
    from zeda_megatron.bridge.hf_config import model_info, transformer_config

    dtype = trainer.dtype
    try:
        transformer_config(
            model_info(model.hf_config), params_dtype=dtype, mcore=model.mcore, tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp, sequence_parallel=layout.sp,
            pipeline_dtype=dtype if layout.pp > 1 else None,
        )
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"model.mcore: megatron-core rejects these settings: {e}") from e


def _optional_str(cfg, path: str) -> str | None:
    """A path-like value, or None when unset or not resolvable outside a Hydra run (${hydra:...})."""
    try:
        v = get(cfg, path)
    except ConfigError:
        return None
    return str(v) if v else None
