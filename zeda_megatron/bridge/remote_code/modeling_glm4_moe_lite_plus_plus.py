"""GLM-4.7-Flash (glm4_moe_lite) with zero-computation (null) experts.

Sigmoid router over E real + Z null experts: selection by sigmoid(logit) + e_score_correction_bias
([E+Z]), group-limited when n_group > 1 (groups over all E+Z), the selected sigmoid scores
renormalised (null slots included) and scaled by routed_scaling_factor. A null expert's output is
exactly zero and its weight is dropped; the shared expert is always added. ``use_zce_mask=True``
excludes the null experts: the original GLM routing. Per-expert weight layout.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteForCausalLM, Glm4MoeLiteMLP

from .configuration_glm4_moe_lite_plus_plus import Glm4MoeLitePlusPlusConfig


def _num_zce(config) -> int:
    nums = getattr(config, "zce_nums", None) or [0]
    types = getattr(config, "zce_types", None) or ["zero"]
    if any(t != "zero" for t in types):
        raise ValueError(f"zce_types={types}: only 'zero' experts are implemented here")
    return int(nums[0])


class Glm4MoeLitePlusPlusRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.num_zce = _num_zce(config)
        total = self.num_experts + self.num_zce
        self.weight = nn.Parameter(torch.zeros(total, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(total, dtype=torch.float32))


class Glm4MoeLitePlusPlusMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.num_zce = _num_zce(config)
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.use_zce_mask = bool(getattr(config, "use_zce_mask", False))
        self.gate = Glm4MoeLitePlusPlusRouter(config)
        self.experts = nn.ModuleList(
            [Glm4MoeLiteMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(self.num_experts)]
        )
        self.shared_experts = Glm4MoeLiteMLP(
            config=config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
        )

    def route(self, x):
        total = self.num_experts + self.num_zce
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.gate.e_score_correction_bias.float()
        if self.use_zce_mask and self.num_zce:
            choice[:, self.num_experts:] = float("-inf")
        if self.n_group > 1:
            group_scores = choice.view(-1, self.n_group, total // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, total // self.n_group).reshape(-1, total)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        index = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, (weights * self.routed_scaling_factor).to(x.dtype), index

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
        return out.reshape(shape) + self.shared_experts(hidden_states)


class Glm4MoeLitePlusPlusForCausalLM(Glm4MoeLiteForCausalLM):
    config_class = Glm4MoeLitePlusPlusConfig
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            if config.mlp_layer_types[i] == "sparse":
                layer.mlp = Glm4MoeLitePlusPlusMoE(config)
        self.post_init()


__all__ = ["Glm4MoeLitePlusPlusForCausalLM"]
