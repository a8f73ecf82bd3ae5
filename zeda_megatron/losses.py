"""Distillation losses in plain torch, exact over the full vocabulary, optionally vocab-parallel.

The teacher's logits are in hand (it is co-located with the student), so KL terms are computed
exactly over every vocabulary entry rather than from sampled or top-k log-probs. With tensor
parallelism the vocabulary is split across the ranks of ``group``: pass each rank's shard and the
group; the log-partition functions are all-reduced (differentiably) so every rank gets the exact
per-token value.

Shapes: logits [..., V_local]; the returned per-token values have the leading shape [...].

These take materialised logits. At a large vocabulary and long sequences use
:mod:`zeda_megatron.linear_kl`, which computes the same values (and gradients) from the final
hidden states and the output weight per token chunk, without materialising the logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


class _SumOverVocabShards(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward, for the *final* per-token reduction:
    every rank then holds the same full-vocabulary value and back-propagates the same loss, which
    reaches each rank's own terms once. (The log-partition function inside :func:`log_softmax` is
    different: its gradient gathers partial contributions from every shard, so it all-reduces.)"""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_reduce(x, group):
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _SumOverVocabShards.apply(x, group)


def log_softmax(logits: torch.Tensor, group=None) -> torch.Tensor:
    """log_softmax over the last dim; with ``group``, over the vocabulary split across its ranks."""
    logits = logits.float()
    if group is None or dist.get_world_size(group) == 1:
        return torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        shift = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - shift
    sum_exp = dist_fn.all_reduce(shifted.exp().sum(dim=-1, keepdim=True), group=group)
    return shifted - sum_exp.log()


def _vocab_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.sum(dim=-1), group)


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, group=None) -> torch.Tensor:
    """Exact per-token KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)).

    Mode-seeking: the on-policy (stage 2) objective. The teacher side carries no gradient."""
    log_s = log_softmax(student_logits / temperature, group)
    log_t = log_softmax(teacher_logits.detach() / temperature, group)
    return _vocab_sum(log_s.exp() * (log_s - log_t), group)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0, group=None) -> torch.Tensor:
    """Exact per-token KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))."""
    log_s = log_softmax(student_logits / temperature, group)
    log_t = log_softmax(teacher_logits.detach() / temperature, group)
    return _vocab_sum(log_t.exp() * (log_t - log_s), group)


def token_logprob(logits, tokens, group=None, vocab_start: int = 0) -> torch.Tensor:
    """log p(tokens) under ``logits``; with a vocab shard starting at ``vocab_start`` on each rank."""
    logp = log_softmax(logits, group)
    local = tokens - vocab_start
    in_shard = (local >= 0) & (local < logp.shape[-1])
    picked = logp.gather(-1, local.clamp(0, logp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * in_shard
    return _all_reduce(picked, group)


def sampled_reverse_kl(student_logits, teacher_logits, tokens, group=None, vocab_start: int = 0):
    """The reference release's on-policy estimator, for tokens sampled from the student.

    Returns (surrogate, estimate) per token. ``estimate = log p_s(y) - log p_t(y)`` is an unbiased
    single-sample estimate of KL(student || teacher); ``surrogate = -A * log p_s(y)`` with the
    advantage ``A = log p_t(y) - log p_s(y)`` held constant has, in expectation over y ~ p_s, the
    gradient of that KL (a score-function estimator: E[grad log p_s] = 0, so no baseline is needed).
    """
    log_s = token_logprob(student_logits, tokens, group, vocab_start)
    log_t = token_logprob(teacher_logits.detach(), tokens, group, vocab_start)
    advantage = (log_t - log_s).detach()
    return -advantage * log_s, (log_s - log_t).detach()
