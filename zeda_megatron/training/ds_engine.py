"""``engine=deepspeed``: the megatron-core student wrapped by a DeepSpeed engine (ZeRO 1/2/3, CPU
offload), the frozen teacher beside it (never handed to DeepSpeed), the same trainer loop.

This module builds DeepSpeed's engine around the student (:func:`wrap_student`: DeepSpeed's config,
megatron-core's expert groups under DeepSpeed-MoE's names, the optimizer groups).
:class:`zeda_megatron.training.engine.DeepSpeedTrainEngine` steps it behind the trainer's engine
interface: ``start_step`` (zero the gradients, set the loss scale), the backward (megatron-core's
schedule runs it: the DeepSpeed engine's forward registers its backward hooks on the student's output,
so ``torch.autograd.backward`` in the schedule is a DeepSpeed backward), ``finish_step`` (DeepSpeed's
step: ZeRO reduction, grad clipping, AdamW, LR from megatron's OptimizerParamScheduler), ``current_lr``,
``save_state``/``load_state`` (DeepSpeed's own save_checkpoint/load_checkpoint, plus the student's
weights per expert-parallel rank for export).

Gradients equal megatron's: megatron sums the per-token loss over micro-batches and DP ranks and
divides the gradients by the global token count (``calculate_per_token_loss``); DeepSpeed averages
over the DP group (divides every gradient, expert ones included, by the dense DP size, then sums
dense gradients over DP and expert gradients over the expert-data-parallel group). The loss (and the
MoE aux-loss scale, through ``config.grad_scale_func``) is therefore scaled by ``dp / tokens``
before the backward, ``tokens`` the step's loss-mask sum over DP (known before the forward).

Expert parameters (megatron-core marks them ``allreduce=False``, which is DeepSpeed's
``is_moe_param``) go into optimizer groups ``{'moe': True, 'name': 'ep_size_<ep>'}``; megatron-core's
expert-parallel and expert-data-parallel groups are registered in ``deepspeed.utils.groups`` under
that name, so ZeRO partitions and reduces them over the expert-data-parallel group. DeepSpeed finds
MoE layers only among its own MoE modules; :class:`_MegatronMoEEngine` tells it about megatron's.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist

from zeda_megatron.platform import on_cpu
from zeda_megatron.spec import EngineSpec, OptimSpec, RunSpec
from zeda_megatron.training.build import build_scheduler

NEVER = 2**31 - 1  # DeepSpeed's steps_per_print: the trainer logs the steps itself


def deep_merge(base: dict, extra: dict | None) -> dict:
    """``base`` updated by ``extra`` recursively (engine.config passthrough)."""
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def expert_group_name(ep: int) -> str:
    """DeepSpeed-MoE's name of the expert (data-)parallel groups of expert-parallel size ``ep``."""
    return f"ep_size_{ep}"


def ds_config(engine: EngineSpec, *, optim: OptimSpec, micro_batch_size: int, params_dtype) -> dict:
    """DeepSpeed's config dict from conf/engine/deepspeed.yaml (+ its ``config`` passthrough)."""
    stage = engine.zero_stage
    zero = {"stage": stage, "reduce_scatter": True, "overlap_comm": False, "contiguous_gradients": True}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu()}
    if engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu()}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    base = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": 1,  # the schedule's micro-batches: boundary set by no_sync_func
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW as the client optimizer, also when offloaded
        "bf16": {"enabled": params_dtype == torch.bfloat16},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
    return deep_merge(base, engine.config)


def register_expert_groups(ep: int) -> str:
    """megatron-core's expert-parallel / expert-data-parallel groups under DeepSpeed-MoE's name."""
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    name = expert_group_name(ep)
    ep_group = ps.get_expert_model_parallel_group()
    edp_group = ps.get_expert_data_parallel_group()
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)
    return name


def param_groups(student, *, optim: OptimSpec, group_name: str) -> list[dict]:
    """megatron-core's optimizer groups (its standard no-weight-decay rule for biases and 1-D
    params, dense and expert params apart), with DeepSpeed-MoE's ``moe``/``name`` keys."""
    from deepspeed.moe.utils import is_moe_param
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

    cfg = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay)
    overrides = get_standard_config_overrides(cfg)
    groups: dict = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        wd_mult = 1.0
        for key, override in (overrides or {}).items():
            if key.matches(p, name) and "wd_mult" in override:
                wd_mult = float(override["wd_mult"])
        moe = is_moe_param(p)
        if moe:
            p.group_name = group_name
        groups.setdefault((moe, wd_mult), []).append(p)
    out = []
    for (moe, wd_mult), params in sorted(groups.items()):
        out.append({
            "params": params, "moe": moe, "name": group_name if moe else f"dense_wd{wd_mult:g}",
            "wd_mult": wd_mult, "lr_mult": 1.0, "is_decoupled_lr": False, "is_expert_parallel": moe,
            "default_config": True, "max_lr": optim.lr, "min_lr": optim.min_lr,
        })
    return out


def _engine_class():
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    class _MegatronMoEEngine(DeepSpeedEngine):
        """DeepSpeedEngine that counts megatron-core's expert params (``allreduce=False``) as MoE
        layers, so ZeRO reduces/partitions them over the expert-data-parallel group."""

        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            if any(is_moe_param(p) for p in model.parameters()):
                self.has_moe_layers = True

    return _MegatronMoEEngine


_WORLD_SEEN = []  # the default process group DeepSpeed's cached groups belong to


def init_deepspeed_comm() -> None:
    """DeepSpeed's comm over the process group megatron already made (gloo on CPU, nccl on GPU).
    DeepSpeed caches groups (a clone of the world group) per process: after the process group was
    destroyed and made again (destroy_parallel + init_parallel) they are released first."""
    import deepspeed
    from deepspeed.utils import groups

    world = dist.group.WORLD
    if _WORLD_SEEN and _WORLD_SEEN[0] is not world:
        groups._release_process_group_references(None)
    _WORLD_SEEN[:] = [world]
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl", dist_init_required=False)


@contextlib.contextmanager
def _quiet_deepspeed():
    import logging

    lg = logging.getLogger("DeepSpeed")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def wrap_student(student, spec: RunSpec):
    """The student wrapped by DeepSpeed per ``spec.engine`` (conf/engine/deepspeed.yaml), with torch's
    AdamW over megatron-core's parameter groups and megatron's LR schedule; after
    :func:`init_deepspeed_comm` and init_parallel (PP=1). Returns (DeepSpeed engine, scheduler, ZeRO
    stage, expert-parallel size)."""
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime.config import DeepSpeedConfig
    from megatron.core import parallel_state as ps

    optim, dtype = spec.optim, spec.trainer.dtype
    ep = ps.get_expert_model_parallel_world_size()
    name = register_expert_groups(ep)
    groups = param_groups(student, optim=optim, group_name=name)
    client = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                               eps=optim.adam_eps, weight_decay=optim.weight_decay)
    cfg = ds_config(spec.engine, optim=optim, micro_batch_size=spec.trainer.micro_batch_size, params_dtype=dtype)
    config_class = DeepSpeedConfig(cfg, None)
    set_optimizer_flags(config_class, student)
    with _quiet_deepspeed():
        ds = _engine_class()(args=None, model=student, optimizer=client, model_parameters=None, training_data=None,
                             lr_scheduler=None, mpu=None, dist_init_required=False, collate_fn=None, config=cfg,
                             config_class=config_class)
    ds.has_moe_layers = False  # checkpoints: DeepSpeed's plain path (its MoE path knows only its MoE modules)
    scheduler = build_scheduler(client, optim, spec.trainer.max_steps)
    return ds, scheduler, int(cfg["zero_optimization"]["stage"]), ep
