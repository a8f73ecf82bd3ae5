"""Qwen3-MoE with zero-computation (null) experts.

The router scores E real + Z null experts; top-k runs over all E+Z; a null expert's output is
exactly zero, and its routing weight is dropped (not given back to the real experts). With
``norm_topk_prob`` the K selected weights are renormalised among themselves, null slots included.
``use_zce_mask=True`` sets the null logits to -inf: the original Qwen3-MoE routing.
Weights use the per-expert layout (``mlp.experts.{e}.gate_proj.weight``) of released checkpoints.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeMLP

from .configuration_qwen3_moe_plus_plus import Qwen3MoePlusPlusConfig


def _num_zce(config) -> int:
    nums = getattr(config, "zce_nums", None) or [0]
    types = getattr(config, "zce_types", None) or ["zero"]
    if any(t != "zero" for t in types):
        raise ValueError(f"zce_types={types}: only 'zero' experts are implemented here")
    return int(nums[0])


class Qwen3MoePlusPlusRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_zce = _num_zce(config)
        self.weight = nn.Parameter(torch.zeros(self.num_experts + self.num_zce, config.hidden_size))


class Qwen3MoePlusPlusSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_zce = _num_zce(config)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.use_zce_mask = bool(getattr(config, "use_zce_mask", False))
        self.gate = Qwen3MoePlusPlusRouter(config)
        self.experts = nn.ModuleList(
            [Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(self.num_experts)]
        )

    def route(self, x):
        logits = F.linear(x.float(), self.gate.weight.float())
        if self.use_zce_mask and self.num_zce:
            logits[:, self.num_experts:] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), index

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.route(x)
        out = torch.zeros_like(x)
        for e in torch.unique(index).tolist():
            if e >= self.num_experts:  # zero-computation expert: contributes nothing
                continue
            tok, slot = torch.where(index == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * weights[tok, slot, None])
        return out.reshape(shape)


class Qwen3MoePlusPlusForCausalLM(Qwen3MoeForCausalLM):
    config_class = Qwen3MoePlusPlusConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            if not isinstance(layer.mlp, Qwen3MoeMLP):  # a sparse layer
                layer.mlp = Qwen3MoePlusPlusSparseMoeBlock(config)
        self.post_init()


__all__ = ["Qwen3MoePlusPlusForCausalLM"]
