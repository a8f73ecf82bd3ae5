"""``engine=deepspeed``: the megatron-core student wrapped by a DeepSpeed engine (ZeRO 1/2/3, CPU
offload), the frozen teacher beside it (never handed to DeepSpeed), the same trainer loop.

What differs from ``engine=megatron`` sits behind the few methods the trainer calls on an engine
(:class:`zeda_megatron.training.build.Engine`): ``start_step`` (zero the gradients, set the loss
scale), the backward (megatron-core's schedule runs it: the DeepSpeed engine's forward registers its
backward hooks on the student's output, so ``torch.autograd.backward`` in the schedule is a DeepSpeed
backward), ``finish_step`` (DeepSpeed's step: ZeRO reduction, grad clipping, AdamW, LR from megatron's
OptimizerParamScheduler), ``current_lr``, ``save_state``/``load_state`` (DeepSpeed's own
save_checkpoint/load_checkpoint, plus the student's weights per expert-parallel rank for export).

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
import json
import os

import torch
import torch.distributed as dist

from zeda_megatron.distributed import comm_device
from zeda_megatron.platform import on_cpu
from zeda_megatron.spec import EngineSpec, OptimSpec, RunSpec
from zeda_megatron.training.build import Engine, build_models, build_scheduler, loss_spec, null_settings
from zeda_megatron.training.distill import CoLocatedDistillation

from zeda_megatron.training.ds_weights import DS_TAG, WEIGHTS, load_student_weights


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
        "steps_per_print": 2**31 - 1,
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


class DeepSpeedTrainEngine(Engine):
    """:class:`Engine` whose student step runs through a DeepSpeed engine (``self.ds``)."""

    kind = "deepspeed"

    def __init__(self, wrapper, ds, scheduler, config, info, null, loss_spec, *, zero_stage: int, ep: int):
        super().__init__(wrapper, ds, ds.optimizer, scheduler, config, info, null, loss_spec)
        self.ds = ds
        self.zero_stage = zero_stage
        self.ep = ep
        self.loss_scale = 1.0

    # -- the step -------------------------------------------------------------------------------
    def start_step(self, microbatches: list[dict]) -> None:
        from megatron.core import parallel_state as ps

        self.ds.zero_grad()
        tokens = torch.zeros(1, dtype=torch.float64, device=comm_device())
        for mb in microbatches:
            tokens += mb["loss_mask"].detach().double().sum().to(tokens.device)
        dist.all_reduce(tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
        self.loss_scale = ps.get_data_parallel_world_size() / max(float(tokens), 1.0)

    def finish_step(self):
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        self.scheduler.step(increment=1)
        return bool(torch.isfinite(torch.tensor(norm))), norm

    def current_lr(self) -> float:
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def _no_sync(self):
        ds = self.ds

        @contextlib.contextmanager
        def ctx():
            ds.set_gradient_accumulation_boundary(False)
            try:
                yield
            finally:
                ds.set_gradient_accumulation_boundary(True)

        return ctx()

    def _finalize(self, model, num_tokens=None, **kw):
        """What megatron's finalize_model_grads does beyond DP reduction and token scaling (both
        DeepSpeed's / the loss scale's here): the expert-bias update."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        cfg = self.config
        routers = [] if not getattr(cfg, "moe_router_enable_expert_bias", False) else \
            [m for m in self.student.modules() if getattr(m, "expert_bias", None) is not None
             and m.training and not getattr(m, "frozen_expert_bias", False)]
        if routers:
            new = get_updated_expert_bias(
                torch.stack([r.local_tokens_per_expert for r in routers]),
                torch.stack([r.expert_bias for r in routers]), cfg.moe_router_bias_update_rate,
                tp_dp_cp_group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
            for r, b in zip(routers, new):
                r.expert_bias.copy_(b)
        reset_model_temporary_tensors(cfg, [self.student])

    # -- checkpoints ------------------------------------------------------------------------------
    def save_state(self, path: str) -> None:
        """DeepSpeed's save_checkpoint into ``path/ds`` (module, ZeRO partitions of the optimizer)
        and this expert-parallel rank's student weights (``student_ep###.pt``, gathered under
        ZeRO-3) for export / ``model.init_checkpoint``."""
        from megatron.core import parallel_state as ps

        self.ds.save_checkpoint(path, tag=DS_TAG, save_latest=False)
        state = self.full_student_state()
        if ps.get_expert_data_parallel_rank() == 0:
            ep_rank = ps.get_expert_model_parallel_rank()
            torch.save(state, os.path.join(path, WEIGHTS.format(ep=ep_rank)))
            if dist.get_rank() == 0:
                with open(os.path.join(path, "ds_layout.json"), "w") as f:
                    json.dump({"ep": self.ep, "zero_stage": self.zero_stage}, f)
        dist.barrier()

    def load_state(self, path: str) -> None:
        load_path, _ = self.ds.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=False)
        if load_path is None:
            raise FileNotFoundError(f"{path!r}: DeepSpeed checkpoint tag {DS_TAG!r} not found")
        if self.zero_stage < 3:  # module states hold one EP rank's experts: restore this rank's
            load_student_weights(self.student, path)

    def full_student_state(self) -> dict:
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()
                        if torch.is_tensor(v)}
        return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items() if torch.is_tensor(v)}

    # -- accounting -------------------------------------------------------------------------------
    def optimizer_state_bytes(self) -> dict:
        """Bytes of this rank's optimizer state (Adam moments + fp32 master partitions), by device."""
        return optimizer_state_bytes(self.ds.optimizer)


def optimizer_state_bytes(optimizer, masters: bool = True) -> dict:
    """{device type: bytes} of the tensors in an optimizer's state (Adam's moments and step
    counters) and, with ``masters``, a DeepSpeed ZeRO optimizer's fp32 master partitions, measured
    from the tensors."""
    out: dict = {}
    seen = set()

    def add(t):
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()

    chained = getattr(optimizer, "chained_optimizers", None)  # megatron: dense + expert optimizers
    for opts in (chained if chained else [optimizer]):
        while not isinstance(opts, torch.optim.Optimizer) and hasattr(opts, "optimizer"):
            opts = opts.optimizer  # megatron's / DeepSpeed's wrapper -> the torch optimizer
        for st in opts.state.values():
            for v in st.values():
                add(v)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat") if masters else ():
        for t in getattr(optimizer, name, None) or []:
            add(t)
    return out


def build_ds_engine(spec: RunSpec, hf_dir: str) -> DeepSpeedTrainEngine:
    """Teacher + student as :func:`zeda_megatron.training.build.build_megatron_engine`, the student wrapped
    by DeepSpeed (``spec.engine``: conf/engine/deepspeed.yaml). After init_parallel (PP=1)."""
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime.config import DeepSpeedConfig
    from megatron.core import parallel_state as ps

    optim, dtype = spec.optim, spec.trainer.dtype
    init_deepspeed_comm()
    teacher, student, config, info = build_models(spec, hf_dir)
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
    wrapper = CoLocatedDistillation(ds, teacher)
    engine = DeepSpeedTrainEngine(wrapper, ds, scheduler, config, info, null_settings(spec), loss_spec(spec),
                                  zero_stage=int(cfg["zero_optimization"]["stage"]), ep=ep)
    config.no_sync_func = engine._no_sync
    config.finalize_model_grads_func = engine._finalize
    config.grad_scale_func = lambda loss: loss * engine.loss_scale
    return engine
