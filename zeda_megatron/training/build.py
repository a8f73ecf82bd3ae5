"""The parts of a training engine on this rank (:mod:`zeda_megatron.training.engine` assembles them):
teacher and student (HF weights loaded, null rows drawn for the student), the megatron engine's DDP
wrapper and optimizer, the LR scheduler both engines use, the loss and null-expert settings.

Training machinery is megatron-core's: DistributedDataParallel, get_megatron_optimizer (the
distributed optimizer where the platform allows: not on CPU, where it requires CUDA tensors),
OptimizerParamScheduler (cosine with warmup, constant), grad clipping, finalize_model_grads (DP
all-reduce, embedding grads across stages, TP sums of sequence-parallel weights, the expert-bias
update). Call after :func:`zeda_megatron.distributed.init_parallel`; the layout itself was checked
before (:func:`zeda_megatron.layout.check_layout`, through the config validation).
"""

from __future__ import annotations

import torch

from zeda_megatron import assumptions
from zeda_megatron.mcore.config import NullExpertSettings
from zeda_megatron.platform import on_cpu
from zeda_megatron.spec import OptimSpec, RunSpec
from zeda_megatron.training.distill import LossSpec


def check_distributed_optimizer(optim: OptimSpec) -> None:
    """megatron-core's distributed optimizer requires CUDA tensors: refused on the CPU platform (not in
    the fake-tensor rehearsal, whose data-free tensors stand for the GPU run's)."""
    if optim.distributed_optimizer and on_cpu() and assumptions.current() is None:
        raise ValueError("optim.use_distributed_optimizer=true needs CUDA (megatron-core checks for "
                         "torch.cuda tensors); use auto or false on CPU")


def cpu_offload_settings(optim: OptimSpec) -> dict:
    """megatron-core's CPU optimizer offload (HybridDeviceOptimizer) from optim.optimizer_cpu_offload /
    optim.optimizer_offload_fraction; megatron runs it through the precision-aware optimizer path (as
    Megatron-LM's --optimizer-cpu-offload requires --use-precision-aware-optimizer)."""
    if not optim.cpu_offload:
        return {}
    return dict(optimizer_cpu_offload=True, use_precision_aware_optimizer=True,
                optimizer_offload_fraction=optim.offload_fraction)


def null_settings(spec: RunSpec) -> NullExpertSettings:
    null = spec.model.null
    return NullExpertSettings(num_null_experts=null.num, null_weight=null.weight, mask_null_experts=null.mask)


def loss_spec(spec: RunSpec) -> LossSpec:
    st = spec.stage
    return LossSpec(st.name, st.nll_weight, st.kl_weight, st.kl, st.temperature, fused=st.fused_loss)


def build_models(spec: RunSpec, hf_dir: str | None):
    """(teacher, student, student TransformerConfig, HF model info) for this rank, weights loaded from
    ``hf_dir``; with ``hf_dir`` None (``model.source == "shapes"``: the plan's and the rehearsal's
    models) from the HF config's shapes alone, megatron-core's initialisation, no file read."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.bridge.import_hf import load_hf_weights

    if hf_dir is None and spec.model.source != "shapes":
        raise ValueError("build_models needs the original model's HF folder (model.hf_dir) unless the spec is "
                         "shapes-only")
    source = spec.model.hf_config if hf_dir is None else hf_dir

    def load(model):
        if hf_dir is not None:
            load_hf_weights(model, hf_dir, seed=spec.seed)

    dtype, sp, mcore = spec.trainer.dtype, spec.layout.sp, spec.model.mcore
    # model.mcore: TransformerConfig fields (bridge/hf_config.py); the frozen teacher has no weight
    # gradients to accumulate (and no DDP main_grad buffers for TE's fused accumulation to write into)
    teacher_mcore = {k: v for k, v in mcore.items() if k != "gradient_accumulation_fusion"}
    teacher, info, _ = build_model(source, None, params_dtype=dtype, sequence_parallel=sp, mcore=teacher_mcore)
    load(teacher)
    RouterReplay.clear_global_router_replay_instances()  # one student per process owns the list
    student_overrides = dict(
        moe_router_load_balancing_type="grouped_aux_loss", moe_aux_loss_coeff=spec.model.group_loss_coeff,
        calculate_per_token_loss=True, moe_enable_routing_replay=spec.stage.router_replay, sequence_parallel=sp,
    )
    if spec.trainer.recompute == "full":
        student_overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif spec.trainer.recompute == "selective":  # megatron-core's default selective set (core attention)
        student_overrides.update(recompute_granularity="selective")
    student, _, config = build_model(source, null_settings(spec), params_dtype=dtype, mcore=mcore, **student_overrides)
    load(student)
    if spec.model.init_checkpoint:
        from zeda_megatron.training.checkpoint import load_model_only

        load_model_only(student, spec.model.init_checkpoint)
    return teacher, student, config, info


def build_scheduler(optimizer, optim: OptimSpec, max_steps: int):
    """megatron-core's OptimizerParamScheduler (cosine with warmup, or constant) for any torch or
    megatron optimizer: one schedule for both engines."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = optim.warmup_steps(max_steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(max_steps, 1), lr_decay_style=optim.schedule,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(max_steps, 1),
        wd_incr_style="constant",
    )


def build_optimizer(student, config, spec: RunSpec):
    """(DDP wrapper, megatron optimizer, OptimizerParamScheduler) for the student; wires the
    config's no_sync / finalize_model_grads / grad_scale hooks the schedule calls."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from zeda_megatron.distributed import gloo_groups

    optim, dtype = spec.optim, spec.trainer.dtype
    check_distributed_optimizer(optim)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=optim.grad_reduce_in_fp32, overlap_grad_reduce=False,
        use_distributed_optimizer=optim.distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=student)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=optim.distributed_optimizer,
        adam_eps=optim.adam_eps, **cpu_offload_settings(optim),
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=gloo_groups())
    scheduler = build_scheduler(optimizer, optim, spec.trainer.max_steps)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = lambda model, num_tokens=None, **kw: finalize_model_grads([ddp], num_tokens, **kw)
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, scheduler
