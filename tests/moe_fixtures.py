"""Shared builders for null-expert MoE layer tests: configs, stock/null layers, a plain-torch
reference of the layer's math."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeda_megatron.platform import cpu_config_overrides
from zeda_megatron.routing import route

H, FFN, SHARED_FFN = 16, 12, 20


def make_config(kind="softmax", num_experts=8, topk=4, dispatcher="alltoall", shared=False,
                balancing="none", coeff=0.0, groups=None, **extra):
    from megatron.core.transformer import TransformerConfig

    kw = dict(
        num_layers=1, hidden_size=H, ffn_hidden_size=32, num_attention_heads=2,
        num_moe_experts=num_experts, moe_router_topk=topk, moe_ffn_hidden_size=FFN,
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=coeff, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, moe_router_dtype="fp32", **cpu_config_overrides(),
    )
    if kind == "sigmoid":
        kw.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_bias_update_rate=1e-2, moe_router_topk_scaling_factor=1.8)
    if groups:
        kw.update(moe_router_num_groups=groups[0], moe_router_group_topk=groups[1])
    if shared:
        kw.update(moe_shared_expert_intermediate_size=SHARED_FFN)
    kw.update(extra)
    return TransformerConfig(**kw)


def stock_spec(num_experts):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return get_moe_module_spec(use_te=False, num_experts=num_experts)


def build_stock(config):
    return stock_spec(config.num_moe_experts)(config=config, layer_number=1)


def build_null(config, null):
    from zeda_megatron.mcore.specs import null_moe_spec

    return null_moe_spec(stock_spec(config.num_moe_experts), null)(config=config, layer_number=1)


def randomize_(layer, seed=0, bias_scale=0.1):
    """Deterministic random weights (router rows with spread, so routing is non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(layer.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "router" in name else 0.3))
        for name, b in sorted(layer.named_buffers()):
            if name.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * bias_scale)


def expert_weights(layer):
    """Per-expert (fc1 [2F, H], fc2 [H, F]) of a SequentialMLP, keyed by global expert index."""
    out = {}
    for i, mlp in enumerate(layer.experts.local_experts):
        out[layer.local_expert_indices[i]] = (mlp.linear_fc1.weight, mlp.linear_fc2.weight)
    return out


def swiglu_mlp(x, fc1, fc2):
    gate, up = torch.chunk(x @ fc1.t(), 2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def reference_forward(x, router_weight, experts, config, num_real, expert_bias_full=None,
                      shared=None):
    """Plain torch: sum over the real experts chosen among E+Z of p * FFN(x) (+ shared FFN)."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens.float() @ router_weight.float().t()
    groups = (config.moe_router_num_groups, config.moe_router_group_topk) if config.moe_router_num_groups else (None, None)
    probs, rmap, null_slots = route(
        logits, num_real=num_real, topk=config.moe_router_topk,
        score_function=config.moe_router_score_function, expert_bias=expert_bias_full,
        scaling_factor=config.moe_router_topk_scaling_factor, normalize_topk=not config.moe_router_pre_softmax,
        num_groups=groups[0], group_topk=groups[1],
    )
    out = torch.zeros_like(tokens)
    for e, (fc1, fc2) in experts.items():
        rows = rmap[:, e].nonzero().squeeze(-1)
        if rows.numel():
            out = out.index_add(0, rows, probs[rows, e].unsqueeze(-1) * swiglu_mlp(tokens[rows], fc1, fc2))
    if shared is not None:
        out = out + swiglu_mlp(tokens, *shared)
    return out.view_as(x), rmap, null_slots
