"""Building the trainer's state on this rank: teacher and student (HF weights loaded, null rows drawn
for the student), the student's megatron DDP wrapper, optimizer and LR scheduler, bundled as
:class:`Engine`.

Training machinery is megatron-core's: DistributedDataParallel, get_megatron_optimizer (the
distributed optimizer where the platform allows: not on CPU, where it requires CUDA tensors),
OptimizerParamScheduler (cosine with warmup, constant), grad clipping, finalize_model_grads (DP
all-reduce, embedding grads across stages, TP sums of sequence-parallel weights, the expert-bias
update). Call after :func:`zeda_megatron.distributed.init_parallel`; the layout itself was checked
before (:func:`zeda_megatron.layout.check_layout`, through the config validation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeda_megatron.platform import on_cpu
from zeda_megatron.training.distill import CoLocatedDistillation, LossSpec


@dataclass
class Engine:
    """What a step needs: the co-located pair, the student's DDP wrapper, optimizer, scheduler,
    the student's TransformerConfig, the HF model info, the null-expert settings, the loss."""

    wrapper: CoLocatedDistillation
    ddp: object
    optimizer: object
    scheduler: object
    config: object
    info: object
    null: object
    loss_spec: LossSpec

    @property
    def student(self):
        return self.wrapper.student

    @property
    def teacher(self):
        return self.wrapper.teacher

    # The engine-specific operations of a step (engine=deepspeed overrides them:
    # zeda_megatron/training/ds_engine.py); the backward runs in megatron-core's schedule.
    kind = "megatron"

    def start_step(self, microbatches: list) -> None:
        """Before the forward/backward: zero the gradients (DDP buffers and optimizer)."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finish_step(self):
        """After the backward: optimizer step (clipping included), LR schedule; (ok, grad_norm)."""
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return ok, grad_norm

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def resolve_distributed_optimizer(optim: dict) -> bool:
    """optim.use_distributed_optimizer: ``auto`` turns it on off the CPU (megatron-core's distributed
    optimizer requires CUDA tensors)."""
    cpu = on_cpu()
    dist_opt = optim.get("use_distributed_optimizer", "auto")
    dist_opt = (not cpu) if dist_opt in ("auto", None) else bool(dist_opt)
    if dist_opt and cpu:
        raise ValueError("optim.use_distributed_optimizer=true needs CUDA (megatron-core checks for "
                         "torch.cuda tensors); use auto or false on CPU")
    return dist_opt


def cpu_offload_settings(optim: dict) -> dict:
    """megatron-core's CPU optimizer offload (HybridDeviceOptimizer) from optim.optimizer_cpu_offload /
    optim.optimizer_offload_fraction; megatron runs it through the precision-aware optimizer path (as
    Megatron-LM's --optimizer-cpu-offload requires --use-precision-aware-optimizer)."""
    if not optim.get("optimizer_cpu_offload", False):
        return {}
    return dict(optimizer_cpu_offload=True, use_precision_aware_optimizer=True,
                optimizer_offload_fraction=float(optim.get("optimizer_offload_fraction", 1.0)))


def build_models(*, hf_dir: str, null, group_loss_coeff: float, seed: int, params_dtype, sequence_parallel: bool,
                 init_checkpoint: str | None = None, recompute: str | None = None, router_replay: bool = False,
                 mcore: dict | None = None):
    """(teacher, student, student TransformerConfig, HF model info) for this rank, weights loaded."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.bridge.import_hf import load_hf_weights

    # model.mcore: TransformerConfig fields (bridge/hf_config.py); the frozen teacher has no weight
    # gradients to accumulate (and no DDP main_grad buffers for TE's fused accumulation to write into)
    teacher_mcore = {k: v for k, v in (mcore or {}).items() if k != "gradient_accumulation_fusion"}
    teacher, info, _ = build_model(hf_dir, None, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                   mcore=teacher_mcore)
    load_hf_weights(teacher, hf_dir, seed=seed)
    RouterReplay.clear_global_router_replay_instances()  # one student per process owns the list
    student_overrides = dict(
        moe_router_load_balancing_type="grouped_aux_loss", moe_aux_loss_coeff=group_loss_coeff,
        calculate_per_token_loss=True, moe_enable_routing_replay=router_replay, sequence_parallel=sequence_parallel,
    )
    if recompute == "full":
        student_overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":  # megatron-core's default selective set (core attention)
        student_overrides.update(recompute_granularity="selective")
    student, _, config = build_model(hf_dir, null, params_dtype=params_dtype, mcore=mcore, **student_overrides)
    load_hf_weights(student, hf_dir, seed=seed)
    if init_checkpoint:
        from zeda_megatron.training.checkpoint import load_model_only

        load_model_only(student, init_checkpoint)
    return teacher, student, config, info


def build_optimizer(student, config, *, optim: dict, max_steps: int, params_dtype):
    """(DDP wrapper, megatron optimizer, OptimizerParamScheduler) for the student; wires the
    config's no_sync / finalize_model_grads / grad_scale hooks the schedule calls."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dist_opt = resolve_distributed_optimizer(optim)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bool(optim.get("grad_reduce_in_fp32", True)), overlap_grad_reduce=False,
        use_distributed_optimizer=dist_opt,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=student)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim["lr"], min_lr=optim.get("min_lr", 0.0), weight_decay=optim.get("weight_decay", 0.0),
        adam_beta1=optim.get("adam_beta1", 0.9), adam_beta2=optim.get("adam_beta2", 0.999),
        clip_grad=optim.get("clip_grad", 1.0), bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=dist_opt, adam_eps=optim.get("adam_eps", 1e-8),
        **cpu_offload_settings(optim),
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    warmup = int(round(optim.get("warmup_fraction", 0.0) * max_steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim["lr"], max_lr=optim["lr"], min_lr=optim.get("min_lr", 0.0),
        lr_warmup_steps=warmup, lr_decay_steps=max(max_steps, 1),
        lr_decay_style=optim.get("schedule", "cosine"), start_wd=optim.get("weight_decay", 0.0),
        end_wd=optim.get("weight_decay", 0.0), wd_incr_steps=max(max_steps, 1), wd_incr_style="constant",
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = lambda model, num_tokens=None, **kw: finalize_model_grads([ddp], num_tokens, **kw)
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, scheduler


def build_engine(*, hf_dir: str, null, group_loss_coeff: float, loss_spec: LossSpec, optim: dict,
                 max_steps: int, seed: int,
                 init_checkpoint: str | None = None, recompute: str | None = None, router_replay: bool = False,
                 params_dtype=None, sequence_parallel: bool = False, mcore: dict | None = None) -> Engine:
    """Build teacher and student for this rank (after init_parallel), load the HF weights into both
    (null rows drawn for the student with ``seed``), wrap the student in DDP and build the optimizer."""
    dtype = params_dtype or (torch.float32 if on_cpu() else torch.bfloat16)
    resolve_distributed_optimizer(optim)  # before any weight is read
    teacher, student, config, info = build_models(
        hf_dir=hf_dir, null=null, group_loss_coeff=group_loss_coeff, seed=seed, params_dtype=dtype,
        sequence_parallel=sequence_parallel, init_checkpoint=init_checkpoint, recompute=recompute,
        router_replay=router_replay, mcore=mcore)
    ddp, optimizer, scheduler = build_optimizer(student, config, optim=optim, max_steps=max_steps, params_dtype=dtype)
    wrapper = CoLocatedDistillation(ddp, teacher)
    return Engine(wrapper, ddp, optimizer, scheduler, config, info, null, loss_spec)
