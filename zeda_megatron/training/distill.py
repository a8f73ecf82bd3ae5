"""The co-located distillation module: student + frozen teacher on the same pipeline stages, and the
last stage's distillation loss.

Both models are built with the same TP/EP/PP layout on the same ranks. At every pipeline stage they
run on the same micro-batch; their hidden states travel together between stages, concatenated on
the last dim (megatron-core's schedule supports this through ``adjust_tensor_shapes_fn``); the last
stage computes the loss from student and teacher logits (vocab-parallel under TP). The teacher has
no gradients, no optimizer state, no DDP buffers and stays in eval mode with its expert bias frozen:
its memory is its weights. Where its output is unused (sampling, stage 1 with ``kl_weight=0``) it
does not run at all and the hidden states travel alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeda_megatron import losses


class CoLocatedDistillation(torch.nn.Module):
    """Runs the student (DDP-wrapped) and the frozen teacher stage by stage.

    With the teacher on (``teacher_enabled``), non-last stages return
    ``cat([student_hidden, teacher_hidden], -1)`` and the last stage ``(student_logits,
    teacher_logits)``; with it off, the student's hidden states / logits alone (the pipeline
    schedule is then run without :func:`double_hidden_shapes`).

    ``forward(input_ids, position_ids, attention_mask=None, padding_mask=None, packed_seq_params=None)``:
    the batch format of the project (right padding, causal attention: ``attention_mask`` None,
    ``padding_mask`` [b, s] True at pads, handed to both models so that pads never reach the router).
    """

    def __init__(self, student_ddp, teacher):
        super().__init__()
        self.module = student_ddp  # megatron's get_attr_wrapped_model unwraps through .module
        self.teacher = teacher
        self.config = student_ddp.module.config
        self.hidden = self.config.hidden_size
        self.teacher_enabled = True
        self.fused_output = False  # last stage: hidden states + output weight instead of logits
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
        if not self.teacher_enabled:
            self.student.set_input_tensor(input_tensor)
            return
        s, t = input_tensor.split(self.hidden, dim=-1)
        self.student.set_input_tensor(s)
        self.teacher.set_input_tensor(t.detach())

    def _stage_padding_mask(self, padding_mask):
        """megatron-core scatters the padding mask over TP (sequence parallel) on the first stage
        only; later stages get it scattered here so the router sees its own tokens' mask."""
        if padding_mask is None or self.student.pre_process or not self.config.sequence_parallel:
            return padding_mask
        from megatron.core import tensor_parallel

        return tensor_parallel.scatter_to_sequence_parallel_region(
            padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()

    def forward(self, input_ids, position_ids, attention_mask=None, padding_mask=None, packed_seq_params=None):
        padding_mask = self._stage_padding_mask(padding_mask)
        kw = dict(padding_mask=padding_mask, packed_seq_params=packed_seq_params)
        if self.fused_output and self.student.post_process:
            from zeda_megatron.linear_kl import output_processor

            kw["output_processor"] = output_processor
        s = self.module(input_ids, position_ids, attention_mask, **kw)
        if not self.teacher_enabled:
            return s
        with torch.no_grad():
            t = self.teacher(input_ids, position_ids, attention_mask, **kw)
        if not self.student.post_process:
            return torch.cat([s, t], dim=-1)
        return s, t


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
    fused: bool = False  # output layer + losses fused per token chunk (zeda_megatron.linear_kl)
    chunk_size: int | None = None  # tokens per chunk of the fused path (None: ~32 MiB per fp32 chunk)

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads the teacher's logits (stage 1 with kl_weight 0 does not)."""
        return self.stage != "sft" or self.kl_weight > 0


def token_losses(student_logits, teacher_logits, labels, spec: LossSpec, tp_group=None, vocab_start=0):
    """Per-token (loss, nll, kl) [b, s] from [b, s, V_local] logits (``teacher_logits`` may be None
    when ``spec.needs_teacher`` is False: kl is then reported as 0)."""
    safe = labels.clamp_min(0)
    logp = losses.token_logprob(student_logits, safe, tp_group, vocab_start)
    nll = -logp
    if spec.stage == "sft":
        if teacher_logits is None:
            return spec.nll_weight * nll, nll.detach(), torch.zeros_like(nll)
        kl = losses.forward_kl(student_logits, teacher_logits, group=tp_group)
        loss = spec.nll_weight * nll + spec.kl_weight * kl
        return loss, nll.detach(), kl.detach()
    if spec.kl == "exact":
        kl = losses.reverse_kl(student_logits, teacher_logits, spec.temperature, group=tp_group)
        return spec.kl_weight * kl, nll.detach(), kl.detach()
    surrogate, estimate = losses.sampled_reverse_kl(student_logits, teacher_logits, safe, tp_group, vocab_start)
    return spec.kl_weight * surrogate, nll.detach(), estimate


def fused_token_losses(student, teacher, batch, spec: LossSpec):
    """Per-token (loss, nll, kl) [b, s] detached and the differentiable masked loss sum, from the
    last stage's :class:`zeda_megatron.linear_kl.OutputHidden` (the output layer and the losses
    computed together per token chunk: no full-vocabulary logits are materialised)."""
    from zeda_megatron.linear_kl import fused_losses_from_outputs

    if spec.stage == "sft":
        kw = dict(nll_weight=spec.nll_weight, forward_kl_weight=spec.kl_weight if teacher is not None else 0.0)
    elif spec.kl == "exact":
        kw = dict(reverse_kl_weight=spec.kl_weight, temperature=spec.temperature)
    else:
        kw = dict(sampled_kl_weight=spec.kl_weight)
    r = fused_losses_from_outputs(student, teacher, batch["labels"], batch["loss_mask"].float(),
                                  chunk_size=spec.chunk_size, **kw)
    if teacher is None:
        kl = torch.zeros_like(r.token_loss)
    else:
        kl = r.forward_kl if spec.stage == "sft" else r.reverse_kl if spec.kl == "exact" else r.sampled_kl
    return r.loss, r.token_loss, r.nll, kl


def loss_func(batch, spec: LossSpec, output):
    """megatron-core loss_func with per-token loss: (loss sum, token count, report). Pads and prompt
    tokens are out through ``loss_mask``; ``output`` is ``(student, teacher)`` logits (or fused
    outputs, :class:`zeda_megatron.linear_kl.OutputHidden`) or the student's alone."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.utils import VocabUtility

    student_logits, teacher_logits = output if isinstance(output, tuple) else (output, None)
    if not torch.is_tensor(student_logits):  # fused output layer + losses
        mask = batch["loss_mask"].float()
        loss_sum, loss, nll, kl = fused_token_losses(student_logits, teacher_logits, batch, spec)
        n = mask.sum()
        report = torch.stack([(loss * mask).sum(), (nll * mask).sum(), (kl * mask).sum(), n])
        return loss_sum, n.to(torch.int), {"sums": report}
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    vocab_start = 0
    if tp > 1:
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
            student_logits.shape[-1], ps.get_tensor_model_parallel_rank(), tp)
    mask = batch["loss_mask"].float()
    teacher = None if teacher_logits is None else teacher_logits.float()
    loss, nll, kl = token_losses(student_logits.float(), teacher, batch["labels"], spec, group, vocab_start)
    # where() rather than a product: a pad's loss may be anything (even inf/nan), it stays out
    keep = mask > 0
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    loss_sum = torch.where(keep, loss * mask, zero).sum()
    n = mask.sum()
    report = torch.stack([torch.where(keep, loss.detach() * mask, zero).sum(), torch.where(keep, nll * mask, zero).sum(),
                          torch.where(keep, kl * mask, zero).sum(), n])
    return loss_sum, n.to(torch.int), {"sums": report}
