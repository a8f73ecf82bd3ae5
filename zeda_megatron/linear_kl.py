"""Fused output layer + distillation losses, chunked over tokens, vocab-parallel under TP.

The exact full-vocabulary KL needs the student's and the teacher's logits over the whole
vocabulary. Materialising them (``[tokens, V/TP]`` fp32, several tensors at once, plus their
gradient) costs tens of GB at s = 8k and a 154k vocabulary. Here the output layer and the losses
run together per chunk of tokens, from the **final hidden states** and the output-layer weights
(the "fused linear" approach of Liger-Kernel's fused linear cross-entropy / JSD): the forward pass
computes, chunk by chunk, the student's and the teacher's logits, the per-token losses and the
gradients of the (weighted, summed) loss with respect to the student's hidden states and output
weight; backward only scales those saved gradients by ``grad_output``. Memory beyond the hidden
states and the weights (and the gradients of both) is O(chunk x V/TP).

Terms (per token; ``T`` = ``temperature``; ``p_s``/``p_t`` = student/teacher softmax):

- ``logprob``: log p_s(label) (temperature 1), ``nll = -logprob``;
- ``forward_kl``: KL(teacher || student) = sum_v p_t^T (log p_t^T - log p_s^T);
- ``reverse_kl``: KL(student || teacher) = sum_v p_s^T (log p_s^T - log p_t^T);
- ``sampled_kl``: the on-policy estimator of :func:`zeda_megatron.losses.sampled_reverse_kl`
  (temperature 1, labels = the tokens sampled from the student): the reported value is
  ``log p_s(y) - log p_t(y)``, the loss term is the surrogate ``-A * log p_s(y)`` with
  ``A = log p_t(y) - log p_s(y)`` held constant, whose gradient is ``-A * grad log p_s(y)``.

The differentiable output is the scalar ``sum_n w_n * (nll_weight * nll_n + forward_kl_weight *
forward_kl_n + reverse_kl_weight * reverse_kl_n + sampled_kl_weight * surrogate_n)`` with per-token
weights ``w`` (the loss mask: pads weigh 0 and contribute nothing, neither value nor gradient).
Same values and gradients as :mod:`zeda_megatron.losses` on materialised logits
``logit_scale * hidden @ weight.T``. The teacher side carries no gradient.

Tensor parallelism: ``weight`` is this rank's vocabulary shard ``[V/TP, h]`` (rows ``vocab_start``
onwards, megatron's ColumnParallelLinear layout) and ``group`` the TP group; maxima, partition
sums and per-token sums are all-reduced over ``group`` (a few ``[3, chunk]`` all-reduces per chunk,
never a full-vocabulary gather). Every rank gets the same full-vocabulary per-token values and the
same scalar loss; the weight gradient is this rank's shard's, and the hidden-state gradient is
all-reduced over ``group`` so every rank holds the *full* gradient of the hidden states (this
replaces the all-reduce of the input gradient that ColumnParallelLinear's backward would do).

Sequence parallelism: the hidden states must be the full sequence on every TP rank. Under SP
gather them along the sequence dim first with :func:`gather_sequence_parallel` (whose backward
keeps this rank's slice of the full gradient); :func:`output_processor` does that for you.

Precision: fp32 and bf16 (or fp16) inputs. The logits matmuls run in the inputs' dtype, like
megatron's output layer, and everything after them (softmax, KL, the logits' gradient) in fp32
per chunk; the weight gradient is accumulated over chunks in fp32 and returned in the weight's
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeda_megatron import assumptions

# Elements per [chunk, V/TP] fp32 temporary when no chunk size is given (32 MiB each; a chunk
# holds about six of them).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(vocab_local: int) -> int:
    """Tokens per chunk so that one ``[chunk, vocab_local]`` fp32 tensor is ~32 MiB."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_local))


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of [C, V] tensors (an elementwise product + torch's sum: batched
    matmul would spare the temporary but accumulates sequentially on CPU, ~1e-5 relative error
    over 38k entries against ~1e-7 here)."""
    return torch.linalg.vecdot(a, b)


@dataclass(frozen=True)
class _Config:
    nll_weight: float
    forward_kl_weight: float
    reverse_kl_weight: float
    sampled_kl_weight: float
    temperature: float
    logit_scale: float
    teacher_logit_scale: float
    vocab_start: int
    chunk_size: int
    has_teacher: bool
    has_labels: bool


# rows of the per-token statistics tensor
_STATS = ("loss", "logprob", "forward_kl", "reverse_kl", "sampled_kl")


def _chunk_losses(zs, zt, labels, w, cfg: _Config, group):
    """Per-token statistics [5, C] and d(sum w * loss)/d(zs) [C, V] (fp32) for one chunk.

    ``zs``/``zt`` are the chunk's fp32 student/teacher logits (already scaled); both are
    overwritten. ``zt`` is None without a teacher, ``labels`` None without labels."""
    C, V = zs.shape
    T = float(cfg.temperature)
    stats = zs.new_zeros(len(_STATS), C)
    kl = cfg.has_teacher
    sampled = cfg.has_teacher and cfg.has_labels

    # 1) one shift per side, the max over the whole vocabulary (max(z / T) = max(z) / T, T > 0)
    m = torch.stack([zs.max(dim=-1).values, zt.max(dim=-1).values if kl else zs.new_zeros(C)])
    _all_reduce(m, group, dist.ReduceOp.MAX)
    zs.sub_(m[0].unsqueeze(1))
    if kl:
        zt.sub_(m[1].unsqueeze(1))

    # 2) partition sums (T = 1 for the label terms, T for the KLs) and the label logits, one all-reduce
    rows, index = [], {}

    def add(name, value):
        index[name] = len(rows)
        rows.append(value)

    if cfg.has_labels:
        local = labels - cfg.vocab_start
        in_shard = ((local >= 0) & (local < V)).to(zs.dtype)
        idx = local.clamp(0, V - 1).unsqueeze(1)
        add("se_s1", zs.exp().sum(-1))
        add("y_s", zs.gather(1, idx).squeeze(1) * in_shard)
    if sampled:
        add("se_t1", zt.exp().sum(-1))
        add("y_t", zt.gather(1, idx).squeeze(1) * in_shard)
    if kl:
        if T == 1.0:
            if "se_s1" in index:
                index["se_sT"] = index["se_s1"]
            else:
                add("se_sT", zs.exp().sum(-1))
            if "se_t1" in index:
                index["se_tT"] = index["se_t1"]
            else:
                add("se_tT", zt.exp().sum(-1))
        else:
            add("se_sT", (zs / T).exp_().sum(-1))
            add("se_tT", (zt / T).exp_().sum(-1))
    red = _all_reduce(torch.stack(rows), group) if rows else None
    get = lambda name: red[index[name]]  # noqa: E731

    coef = None
    if cfg.has_labels:
        lse_s1 = get("se_s1").log()
        logp = get("y_s") - lse_s1  # the shifts cancel
        stats[1] = logp
        stats[0] -= cfg.nll_weight * logp
        coef = torch.full_like(logp, cfg.nll_weight)
        if sampled:
            adv = (get("y_t") - get("se_t1").log()) - logp  # A = log p_t(y) - log p_s(y)
            stats[4] = -adv
            stats[0] -= cfg.sampled_kl_weight * adv * logp
            coef += cfg.sampled_kl_weight * adv

    dz = None
    ps = None
    if kl:
        # log-probabilities at temperature T; zs is kept when the label terms still need it (T != 1)
        ls = zs if T == 1.0 else zs / T
        ls.sub_(get("se_sT").log().unsqueeze(1))
        lt = zt if T == 1.0 else zt.div_(T)
        lt.sub_(get("se_tT").log().unsqueeze(1))
        ps = ls.exp()
        pt = lt.exp()
        diff = ls.sub_(lt)  # log p_s - log p_t
        del lt, ls
        kls = _all_reduce(torch.stack([_dot(ps, diff), -_dot(pt, diff)]), group)
        rkl, fkl = kls[0], kls[1]
        stats[2], stats[3] = fkl, rkl
        stats[0] += cfg.forward_kl_weight * fkl + cfg.reverse_kl_weight * rkl
        # d rkl / dz_s = p_s (log p_s - log p_t - rkl) / T ;  d fkl / dz_s = (p_s - p_t) / T
        if cfg.reverse_kl_weight:
            dz = diff.sub_(rkl.unsqueeze(1)).mul_(ps).mul_(cfg.reverse_kl_weight / T)
        del diff
        if cfg.forward_kl_weight:
            g = pt.sub_(ps).mul_(-cfg.forward_kl_weight / T)
            dz = g if dz is None else dz.add_(g)
        del pt
    if cfg.has_labels and (cfg.nll_weight or cfg.sampled_kl_weight):
        # d(-logp)/dz_s = p_s - onehot(label) (T = 1); the surrogate -A logp: A (p_s - onehot)
        p1 = ps if (kl and T == 1.0) else zs.sub_(lse_s1.unsqueeze(1)).exp_()
        g = p1.mul_(coef.unsqueeze(1))
        g.scatter_add_(1, idx, (-coef * in_shard).unsqueeze(1))
        dz = g if dz is None else dz.add_(g)
    if dz is not None:
        dz.mul_(w.unsqueeze(1))
    return stats, dz


class _FusedLinearLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, w, cfg: _Config, group, need_grad: bool):
        n, h = hidden.shape
        stats = hidden.new_zeros(len(_STATS), n, dtype=torch.float32)
        grad_h = torch.zeros(n, h, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        mm_dtype = hidden.dtype
        for a in range(0, n, cfg.chunk_size):
            b = min(n, a + cfg.chunk_size)
            h_c = hidden[a:b]
            zs = torch.mm(h_c, weight.t()).float()
            if cfg.logit_scale != 1.0:
                zs.mul_(cfg.logit_scale)
            zt = None
            if cfg.has_teacher:
                zt = torch.mm(t_hidden[a:b], t_weight.t()).float()
                if cfg.teacher_logit_scale != 1.0:
                    zt.mul_(cfg.teacher_logit_scale)
            st, dz = _chunk_losses(zs, zt, labels[a:b] if labels is not None else None, w[a:b], cfg, group)
            stats[:, a:b] = st
            del zs, zt
            if need_grad and dz is not None:
                if cfg.logit_scale != 1.0:
                    dz.mul_(cfg.logit_scale)
                dz_m = dz.to(mm_dtype)
                del dz
                grad_h[a:b] = torch.mm(dz_m, weight).float()
                if mm_dtype == torch.float32:
                    grad_w.addmm_(dz_m.t(), h_c)
                else:
                    grad_w.add_(torch.mm(dz_m.t(), h_c))
                del dz_m
        loss = (stats[0] * w).sum()
        if need_grad:
            _all_reduce(grad_h, group)  # full hidden-state gradient on every TP rank
            ctx.grads = (grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        else:
            ctx.grads = None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_losses: backward ran twice (or without gradients); "
                               "the saved gradients are released after the first backward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        grad_h.mul_(grad_loss.to(grad_h.dtype))
        grad_w.mul_(grad_loss.to(grad_w.dtype))
        return (grad_h if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None)


@dataclass
class FusedLosses:
    """Result of :func:`fused_linear_losses`. ``loss`` is the differentiable scalar
    ``sum_n w_n * loss_n``; the rest are detached per-token values shaped like the hidden states'
    leading dims (fp32; 0 where the weight is 0), or None where the inputs don't define them
    (no labels: ``logprob``/``nll``/``sampled_kl``; no teacher: the KLs)."""

    loss: torch.Tensor
    token_loss: torch.Tensor
    logprob: torch.Tensor | None
    forward_kl: torch.Tensor | None
    reverse_kl: torch.Tensor | None
    sampled_kl: torch.Tensor | None

    @property
    def nll(self):
        return None if self.logprob is None else -self.logprob


def fused_linear_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    *,
    nll_weight: float = 0.0,
    forward_kl_weight: float = 0.0,
    reverse_kl_weight: float = 0.0,
    sampled_kl_weight: float = 0.0,
    temperature: float = 1.0,
    group=None,
    vocab_start: int = 0,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    teacher_logit_scale: float | None = None,
    skip_zero_weight: bool = True,
) -> FusedLosses:
    """Output layer + losses, fused and chunked (see the module docstring).

    Args:
        hidden: student final hidden states ``[..., h]`` (full sequence; gather first under SP).
        weight: student output weight (this rank's vocab shard) ``[V/TP, h]``; may be the tied
            embedding weight, the gradient reaches it either way.
        teacher_hidden, teacher_weight: the teacher's, same shapes; no gradient. Needed when a KL
            weight is nonzero (the KLs are also reported whenever they are given).
        labels: ``[...]`` long target tokens (next tokens; for the sampled estimator the tokens
            sampled from the student). Negative values (-100) are allowed where the weight is 0.
        token_weights: ``[...]`` per-token weights (the loss mask); None = all ones.
        *_weight: coefficients of the terms in the scalar loss.
        temperature: of the two exact KLs (both sides divided by it); not of nll/sampled.
        group: the TP group the vocabulary is split over (None or size 1: the whole vocabulary).
        vocab_start: first vocabulary id of this rank's shard (``tp_rank * V/TP``).
        chunk_size: tokens per chunk (default: ~32 MiB per ``[chunk, V/TP]`` fp32 temporary).
        logit_scale, teacher_logit_scale: logits = scale * hidden @ weight.T (megatron's MuP
            ``mup_output_mult``); the teacher's defaults to the student's.
        skip_zero_weight: compute only the tokens whose weight is nonzero (one host sync).
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    has_teacher = teacher_hidden is not None
    if (forward_kl_weight or reverse_kl_weight or sampled_kl_weight) and not has_teacher:
        raise ValueError("a KL term needs the teacher's hidden states and output weight")
    if has_teacher and teacher_weight is None:
        raise ValueError("teacher_hidden given without teacher_weight")
    if (nll_weight or sampled_kl_weight) and labels is None:
        raise ValueError("nll / sampled KL need labels")
    lead = hidden.shape[:-1]
    h = hidden.shape[-1]
    if weight.shape[-1] != h:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {h}")
    flat = hidden.reshape(-1, h)
    n = flat.shape[0]
    t_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach() if has_teacher else None
    if has_teacher and t_flat.shape[0] != n:
        raise ValueError("student and teacher hidden states cover different token counts")
    if has_teacher and teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError("student and teacher vocabulary shards differ")
    lab = labels.reshape(-1).long().clamp_min(0) if labels is not None else None
    if lab is not None and lab.shape[0] != n:
        raise ValueError("labels do not match the hidden states' leading dims")
    if token_weights is None:
        w = torch.ones(n, dtype=torch.float32, device=hidden.device)
    else:
        w = token_weights.reshape(-1).to(device=hidden.device, dtype=torch.float32)
        if w.shape[0] != n:
            raise ValueError("token_weights do not match the hidden states' leading dims")
    cfg = _Config(
        nll_weight=float(nll_weight), forward_kl_weight=float(forward_kl_weight),
        reverse_kl_weight=float(reverse_kl_weight), sampled_kl_weight=float(sampled_kl_weight),
        temperature=float(temperature), logit_scale=float(logit_scale),
        teacher_logit_scale=float(logit_scale if teacher_logit_scale is None else teacher_logit_scale),
        vocab_start=int(vocab_start), chunk_size=int(chunk_size or default_chunk_size(weight.shape[0])),
        has_teacher=has_teacher, has_labels=lab is not None,
    )
    if cfg.chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")

    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    active = None
    if skip_zero_weight and token_weights is not None and assumptions.current() is None:  # (rehearsal: all tokens)
        nz = (w != 0).nonzero().squeeze(1)
        if nz.numel() < n:
            active = nz
    if active is not None:
        sub = lambda x: None if x is None else x.index_select(0, active)  # noqa: E731
        loss, st = _FusedLinearLosses.apply(sub(flat), weight, sub(t_flat), teacher_weight, sub(lab), sub(w),
                                            cfg, group, need_grad)
        stats = st.new_zeros(len(_STATS), n)
        stats[:, active] = st
    else:
        loss, stats = _FusedLinearLosses.apply(flat, weight, t_flat, teacher_weight, lab, w, cfg, group, need_grad)
    stats = stats * (w != 0)  # pads report 0
    view = lambda i: stats[i].view(lead)  # noqa: E731
    return FusedLosses(
        loss=loss,
        token_loss=view(0),
        logprob=view(1) if cfg.has_labels else None,
        forward_kl=view(2) if has_teacher else None,
        reverse_kl=view(3) if has_teacher else None,
        sampled_kl=view(4) if (has_teacher and cfg.has_labels) else None,
    )


# ---- convenience wrappers: per-token values (and gradients through sum(w * value)) --------------
def forward_kl(hidden, weight, teacher_hidden, teacher_weight, token_weights=None, temperature=1.0, **kw):
    """Fused exact KL(teacher || student); returns :class:`FusedLosses` (``loss`` = sum w * KL)."""
    return fused_linear_losses(hidden, weight, teacher_hidden, teacher_weight, None, token_weights,
                               forward_kl_weight=1.0, temperature=temperature, **kw)


def reverse_kl(hidden, weight, teacher_hidden, teacher_weight, token_weights=None, temperature=1.0, **kw):
    """Fused exact KL(student || teacher); returns :class:`FusedLosses` (``loss`` = sum w * KL)."""
    return fused_linear_losses(hidden, weight, teacher_hidden, teacher_weight, None, token_weights,
                               reverse_kl_weight=1.0, temperature=temperature, **kw)


def token_nll(hidden, weight, labels, token_weights=None, **kw):
    """Fused -log p_s(labels); returns :class:`FusedLosses` (``loss`` = sum w * nll)."""
    return fused_linear_losses(hidden, weight, None, None, labels, token_weights, nll_weight=1.0, **kw)


def sampled_reverse_kl(hidden, weight, teacher_hidden, teacher_weight, tokens, token_weights=None, **kw):
    """Fused sampled estimator (``loss`` = sum w * surrogate, ``sampled_kl`` = the estimate)."""
    return fused_linear_losses(hidden, weight, teacher_hidden, teacher_weight, tokens, token_weights,
                               sampled_kl_weight=1.0, **kw)


# ---- sequence parallel and megatron's GPTModel.forward(output_processor=...) hook ----------------
class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward keeps this rank's slice of the gradient.

    The backward assumes the incoming gradient is the full gradient, identical on every rank
    (which :func:`fused_linear_losses` produces: it all-reduces the hidden-state gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world, dim=0)[rank].contiguous(), None


def gather_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence-parallel ``[s/tp, ...]`` -> full ``[s, ...]`` for :func:`fused_linear_losses`."""
    if _world(group) == 1:
        return x
    if not torch.is_grad_enabled() or not x.requires_grad:
        with torch.no_grad():
            return _GatherSequence.apply(x, group)
    return _GatherSequence.apply(x, group)


@dataclass
class OutputHidden:
    """What :func:`output_processor` returns instead of logits (the last pipeline stage's output)."""

    hidden_states: torch.Tensor  # [s, b, h], the full sequence (gathered under SP)
    weight: torch.Tensor  # [V/TP, h] output weight (the embedding weight when tied)
    group: object  # the TP group, None when tp == 1
    vocab_start: int  # first vocabulary id of this rank's shard
    logit_scale: float  # megatron's MuP output multiplier (1.0 without MuP)


def output_processor(*, hidden_states, output_layer, output_weight=None, config=None, **_ignored) -> OutputHidden:
    """``GPTModel.forward(..., output_processor=output_processor)``: skip the output layer and
    return :class:`OutputHidden` (hidden states ``[s, b, h]``, gathered along the sequence under
    SP, and the output weight: ``output_weight`` when tied, else ``output_layer.weight``).
    Works for the teacher too (call it under ``torch.no_grad()``)."""
    weight = output_weight if output_weight is not None else output_layer.weight
    if getattr(output_layer, "bias", None) is not None:
        raise NotImplementedError("fused output-layer losses: the output layer has a bias")
    group = getattr(output_layer, "tp_group", None)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) == 1:
        group = None
    if group is not None and getattr(output_layer, "sequence_parallel", False):
        hidden_states = gather_sequence_parallel(hidden_states, group)
    vocab_start = dist.get_rank(group) * weight.shape[0] if group is not None else 0
    scale = 1.0
    if config is not None and getattr(config, "use_mup", False):
        scale = float(getattr(config, "mup_output_mult", 1.0))
    return OutputHidden(hidden_states, weight, group, vocab_start, scale)


def fused_losses_from_outputs(student: OutputHidden, teacher: OutputHidden | None, labels=None,
                              loss_mask=None, **kw) -> FusedLosses:
    """:func:`fused_linear_losses` on two :class:`OutputHidden` (``[s, b, h]``) with ``labels`` and
    ``loss_mask`` in the batch layout ``[b, s]``; the per-token values come back as ``[b, s]``."""
    t = lambda x: None if x is None else x.transpose(0, 1)  # noqa: E731  [b, s] <-> [s, b]
    out = fused_linear_losses(
        student.hidden_states, student.weight,
        teacher.hidden_states if teacher is not None else None, teacher.weight if teacher is not None else None,
        t(labels), t(loss_mask), group=student.group, vocab_start=student.vocab_start,
        logit_scale=student.logit_scale,
        teacher_logit_scale=teacher.logit_scale if teacher is not None else None, **kw)
    return FusedLosses(out.loss, t(out.token_loss), t(out.logprob), t(out.forward_kl), t(out.reverse_kl),
                       t(out.sampled_kl))
