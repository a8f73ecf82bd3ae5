"""The distillation engine: student + frozen teacher co-located on the same pipeline stages.

Both models are built with the same TP/EP/PP layout on the same ranks. At every pipeline stage they
run on the same micro-batch; their hidden states travel together between stages, concatenated on
the last dim (megatron-core's schedule supports this through ``adjust_tensor_shapes_fn``); the last
stage computes the loss from student and teacher logits (vocab-parallel under TP). The teacher has
no gradients, no optimizer state, no DDP buffers and stays in eval mode with its expert bias frozen:
its memory is its weights.

Training machinery is megatron-core's: DistributedDataParallel, get_megatron_optimizer (the
distributed optimizer where the platform allows: not on CPU, where it requires CUDA tensors),
OptimizerParamScheduler (cosine with warmup, constant), grad clipping, finalize_model_grads (DP
all-reduce, embedding grads across stages, the expert-bias update), the 1F1B pipeline schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from zeda_megatron import losses
from zeda_megatron.distributed import all_reduce_host
from zeda_megatron.platform import on_cpu


# ---- the co-located pair ------------------------------------------------------------------------
class CoLocatedDistillation(torch.nn.Module):
    """Runs the student (DDP-wrapped) and the frozen teacher stage by stage.

    Non-last stages return ``cat([student_hidden, teacher_hidden], -1)``; the last stage returns
    ``(student_logits, teacher_logits)``. With ``teacher_enabled = False`` (sampling) the teacher
    is skipped: its half of the activation is zeros and the last stage returns the student logits.
    """

    def __init__(self, student_ddp, teacher):
        super().__init__()
        self.module = student_ddp  # megatron's get_attr_wrapped_model unwraps through .module
        self.teacher = teacher
        self.config = student_ddp.module.config
        self.hidden = self.config.hidden_size
        self.teacher_enabled = True
        freeze_teacher(teacher)

    @property
    def student(self):
        return self.module.module

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        s, t = input_tensor.split(self.hidden, dim=-1)
        self.student.set_input_tensor(s)
        self.teacher.set_input_tensor(t.detach())

    def forward(self, input_ids, position_ids, attention_mask=None):
        s = self.module(input_ids, position_ids, attention_mask)
        if self.teacher_enabled:
            with torch.no_grad():
                t = self.teacher(input_ids, position_ids, attention_mask)
        else:
            t = None
        if not self.student.post_process:
            return torch.cat([s, torch.zeros_like(s) if t is None else t], dim=-1)
        return s if t is None else (s, t)  # the schedule wants a tensor from forward-only passes


def freeze_teacher(teacher) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if hasattr(m, "expert_bias"):
            m.frozen_expert_bias = True


def double_hidden_shapes(recv_shapes, send_shapes):
    """adjust_tensor_shapes_fn: student and teacher hidden states travel together."""
    grow = lambda shapes: [(*s[:-1], 2 * s[-1]) for s in shapes]  # noqa: E731
    return grow(recv_shapes), grow(send_shapes)


# ---- losses on the last stage -------------------------------------------------------------------
@dataclass
class LossSpec:
    stage: str = "sft"  # sft | opd
    nll_weight: float = 1.0
    kl_weight: float = 0.0  # sft: forward KL to the teacher; opd: reverse KL weight
    kl: str = "exact"  # opd: exact | sampled
    temperature: float = 1.0


def token_losses(student_logits, teacher_logits, labels, spec: LossSpec, tp_group=None, vocab_start=0):
    """Per-token (loss, nll, kl) [b, s] from [b, s, V_local] logits."""
    safe = labels.clamp_min(0)
    logp = losses.token_logprob(student_logits, safe, tp_group, vocab_start)
    nll = -logp
    if spec.stage == "sft":
        kl = losses.forward_kl(student_logits, teacher_logits, group=tp_group)
        loss = spec.nll_weight * nll + spec.kl_weight * kl
        return loss, nll.detach(), kl.detach()
    if spec.kl == "exact":
        kl = losses.reverse_kl(student_logits, teacher_logits, spec.temperature, group=tp_group)
        return spec.kl_weight * kl, nll.detach(), kl.detach()
    surrogate, estimate = losses.sampled_reverse_kl(student_logits, teacher_logits, safe, tp_group, vocab_start)
    return spec.kl_weight * surrogate, nll.detach(), estimate


def loss_func(batch, spec: LossSpec, output):
    """megatron-core loss_func with per-token loss: (loss sum, token count, report)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.utils import VocabUtility

    student_logits, teacher_logits = output
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    vocab_start = 0
    if tp > 1:
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            student_logits.shape[-1], ps.get_tensor_model_parallel_rank(), tp)
    mask = batch["loss_mask"].float()
    loss, nll, kl = token_losses(student_logits.float(), teacher_logits.float(), batch["labels"], spec, group, vocab_start)
    n = mask.sum()
    report = torch.stack([(loss.detach() * mask).sum(), (nll * mask).sum(), (kl * mask).sum(), n])
    return (loss * mask).sum(), n.to(torch.int), {"sums": report}


# ---- building ---------------------------------------------------------------------------------------
@dataclass
class Engine:
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


def build_engine(*, hf_dir: str, null, group_loss_coeff: float, loss_spec: LossSpec, optim: dict,
                 max_steps: int, seed: int,
                 init_checkpoint: str | None = None, recompute: str | None = None, router_replay: bool = False,
                 params_dtype=None, sequence_parallel: bool = False) -> Engine:
    """Build teacher and student for this rank (after init_parallel), load the HF weights into both
    (null rows drawn for the student with ``seed``), wrap the student in DDP and build the optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.bridge.import_hf import load_hf_weights

    cpu = on_cpu()
    dtype = params_dtype or (torch.float32 if cpu else torch.bfloat16)
    # megatron-core's distributed optimizer requires CUDA tensors: "auto" turns it on off the CPU
    dist_opt = optim.get("use_distributed_optimizer", "auto")
    dist_opt = (not cpu) if dist_opt in ("auto", None) else bool(dist_opt)
    if cpu and sequence_parallel:
        raise ValueError(
            "parallel.tp>1 training needs parallel.sequence_parallel (megatron-core's MoE layer requires it), "
            "and megatron-core's local norm used on CPU does not support sequence parallelism: on CPU use "
            "parallel.tp=1 (EP, PP and DP all work); TP runs with the Transformer Engine spec on GPUs"
        )
    if dist_opt and cpu:
        raise ValueError("optim.use_distributed_optimizer=true needs CUDA (megatron-core checks for "
                         "torch.cuda tensors); use auto or false on CPU")
    teacher, info, _ = build_model(hf_dir, None, params_dtype=dtype, sequence_parallel=sequence_parallel)
    load_hf_weights(teacher, hf_dir, seed=seed)
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()  # one student per process owns the list
    student_overrides = dict(
        moe_router_load_balancing_type="grouped_aux_loss", moe_aux_loss_coeff=group_loss_coeff,
        calculate_per_token_loss=True, moe_enable_routing_replay=router_replay, sequence_parallel=sequence_parallel,
    )
    if recompute == "full":
        student_overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":  # megatron-core's default selective set (core attention)
        student_overrides.update(recompute_granularity="selective")
    student, _, config = build_model(hf_dir, null, params_dtype=dtype, **student_overrides)
    load_hf_weights(student, hf_dir, seed=seed)
    if init_checkpoint:
        from zeda_megatron.training.checkpoint import load_model_only

        load_model_only(student, init_checkpoint)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=student)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim["lr"], min_lr=optim.get("min_lr", 0.0), weight_decay=optim.get("weight_decay", 0.0),
        adam_beta1=optim.get("adam_beta1", 0.9), adam_beta2=optim.get("adam_beta2", 0.999),
        clip_grad=optim.get("clip_grad", 1.0), bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=dist_opt, adam_eps=optim.get("adam_eps", 1e-8),
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
    wrapper = CoLocatedDistillation(ddp, teacher)
    return Engine(wrapper, ddp, optimizer, scheduler, config, info, null, loss_spec)


# ---- one optimizer step -----------------------------------------------------------------------------
def _pp_size():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def _run_schedule(engine: Engine, microbatches, forward_only: bool, forward_step, *, seq_length=None,
                  collect_non_loss_data=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    kwargs = {}
    if _pp_size() > 1:
        kwargs["adjust_tensor_shapes_fn"] = double_hidden_shapes
    return fb(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=engine.wrapper,
        num_microbatches=len(microbatches), seq_length=seq_length or microbatches[0]["tokens"].shape[1],
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data, **kwargs,
    )


def _positions(batch):
    return batch.get("position_ids", torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand_as(batch["tokens"]))


def train_step(engine: Engine, microbatches, replay=None) -> dict:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step.

    ``replay``: per micro-batch lists of recorded top-k indices (router replay) or None.
    Returns global sums {loss, nll, kl, tokens} (identical on every rank), grad_norm, lr.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    engine.wrapper.train()
    engine.wrapper.teacher_enabled = True
    counter = iter(range(len(microbatches)))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        m = next(counter)
        if replay is not None:
            RouterReplay.set_replay_data(replay[m])
        mask = batch.get("attention_mask")
        out = model(batch["tokens"], _positions(batch), mask)
        return out, partial(loss_func, batch, engine.loss_spec)

    engine.ddp.zero_grad_buffer()
    engine.optimizer.zero_grad()
    if replay is not None:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        reports = _run_schedule(engine, microbatches, False, forward_step)
    finally:
        if replay is not None:
            RouterReplay.clear_global_router_replay_action()
            RouterReplay.clear_global_indices()
    ok, grad_norm, _ = engine.optimizer.step()
    engine.scheduler.step(increment=1)
    sums = torch.zeros(4, dtype=torch.float64)
    for r in reports or []:
        sums += r["sums"].double().cpu()
    sums = _sum_over_last_stage_dp(sums)
    return {
        "loss": (sums[0] / sums[3].clamp_min(1)).item(), "nll": (sums[1] / sums[3].clamp_min(1)).item(),
        "kl": (sums[2] / sums[3].clamp_min(1)).item(), "tokens": int(sums[3].item()),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": engine.optimizer.param_groups[0]["lr"], "update_ok": bool(ok),
    }


def _sum_over_last_stage_dp(sums: torch.Tensor) -> torch.Tensor:
    """Sum per-rank reports over the world, counting each DP replica once (TP ranks hold copies;
    only last-stage ranks report)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return sums
    t = sums.to(torch.float64)
    if not ps.is_pipeline_last_stage(ignore_virtual=True) or ps.get_tensor_model_parallel_rank() != 0:
        t = torch.zeros_like(t)
    return all_reduce_host(t)


# ---- routing metrics over the whole model -----------------------------------------------------------
def null_metrics(engine: Engine, reset: bool = True) -> dict:
    """Null share per layer and overall (all stages, all DP replicas), expert FLOPs removed."""
    from megatron.core import parallel_state as ps

    from zeda_megatron.mcore.specs import routing_stats

    n_layers = engine.config.num_layers
    stats = routing_stats(engine.student, reset=reset)
    t = torch.zeros(n_layers, 2, dtype=torch.float64)
    if ps.get_tensor_model_parallel_rank() == 0:
        for number, s in stats["layers"].items():
            t[number - 1, 0] += s["null_slots"]
            t[number - 1, 1] += s["null_slots"] + s["real_assignments"]
    t = all_reduce_host(t)
    per_layer = {i + 1: (t[i, 0] / t[i, 1]).item() for i in range(n_layers) if t[i, 1] > 0}
    share = (t[:, 0].sum() / t[:, 1].sum().clamp_min(1)).item()
    cfg = engine.config
    routed = cfg.moe_router_topk * cfg.moe_ffn_hidden_size
    shared = cfg.moe_shared_expert_intermediate_size or 0
    return {
        "null_share": share, "null_share_per_layer": per_layer,
        "expert_flops_removed": share,  # routed expert slots (the reference release's measure)
        "expert_flops_removed_incl_shared": share * routed / (routed + shared),
    }
