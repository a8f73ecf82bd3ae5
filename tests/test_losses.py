"""Distillation losses: exact full-vocabulary KLs, the sampled on-policy estimator, vocab-parallel."""

import torch
import torch.nn.functional as F

from dist_helpers import run_distributed
from zeda_megatron import losses

V = 50


def _logits(seed, shape=(4, 6, V), scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_exact_kls_equal_plain_torch_reference():
    s, t = _logits(0), _logits(1)
    ref_rev = (F.softmax(s, -1) * (F.log_softmax(s, -1) - F.log_softmax(t, -1))).sum(-1)
    torch.testing.assert_close(losses.reverse_kl(s, t).double(), ref_rev, rtol=1e-5, atol=1e-6)
    ref_fwd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(losses.forward_kl(s, t).double(), ref_fwd, rtol=1e-5, atol=1e-6)
    assert (losses.reverse_kl(s, s).abs() < 1e-6).all()
    # the teacher side carries no gradient
    s.requires_grad_(True)
    t.requires_grad_(True)
    losses.reverse_kl(s, t).sum().backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_sampled_estimator_matches_exact_reverse_kl_in_mean_and_gradient():
    torch.manual_seed(0)
    s = _logits(2, shape=(3, V), scale=1.0).requires_grad_(True)
    t = _logits(3, shape=(3, V), scale=1.0)
    exact = losses.reverse_kl(s, t)
    (exact_grad,) = torch.autograd.grad(exact.sum(), s)
    n = 40000
    samples = torch.multinomial(F.softmax(s.detach(), -1), n, replacement=True).t()  # [n, 3]
    s_rep, t_rep = s.unsqueeze(0).expand(n, -1, -1), t.unsqueeze(0).expand(n, -1, -1)
    surrogate, estimate = losses.sampled_reverse_kl(s_rep, t_rep, samples)
    torch.testing.assert_close(estimate.mean(0), exact.detach(), rtol=0.05, atol=0.02)
    (mc_grad,) = torch.autograd.grad(surrogate.mean(0).sum(), s)
    torch.testing.assert_close(mc_grad, exact_grad, rtol=0.1, atol=0.01)


def _vocab_parallel(rank, world):
    import torch.distributed as dist

    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=world)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    s, t = _logits(4), _logits(5)
    tokens = torch.randint(0, V, s.shape[:-1], generator=torch.Generator().manual_seed(6))
    shard = V // world
    lo, hi = rank * shard, (rank + 1) * shard if rank < world - 1 else V
    s_local = s[..., lo:hi].clone().requires_grad_(True)
    out = {
        "rev": losses.reverse_kl(s_local, t[..., lo:hi], group=group),
        "fwd": losses.forward_kl(s_local, t[..., lo:hi], group=group),
        "logp": losses.token_logprob(s_local, tokens, group=group, vocab_start=lo),
    }
    (out["rev"].sum() + out["fwd"].sum() + out["logp"].sum()).backward()
    out["grad"] = s_local.grad
    assert dist.get_world_size(group) == world
    return {k: v.detach() for k, v in out.items()} | {"lo": lo, "hi": hi}


def test_vocab_parallel_kl_equals_full_vocabulary():
    results = run_distributed(_vocab_parallel, 2)
    s, t = _logits(4).requires_grad_(True), _logits(5)
    tokens = torch.randint(0, V, s.shape[:-1], generator=torch.Generator().manual_seed(6))
    rev, fwd, logp = losses.reverse_kl(s, t), losses.forward_kl(s, t), losses.token_logprob(s, tokens)
    (rev.sum() + fwd.sum() + logp.sum()).backward()
    for r in results:
        torch.testing.assert_close(r["rev"].double(), rev.detach().double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["fwd"].double(), fwd.detach().double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logp"].double(), logp.detach().double(), rtol=1e-5, atol=1e-6)
        # each shard gets exactly its slice of the full-vocabulary gradient
        torch.testing.assert_close(r["grad"].double(), s.grad[..., r["lo"]:r["hi"]].double(), rtol=1e-5, atol=1e-6)
