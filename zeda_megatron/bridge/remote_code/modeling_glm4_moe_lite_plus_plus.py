"""GLM-4.7-Flash (glm4_moe_lite) with zero-computation (null) experts.

Sigmoid router over E real + Z null experts: selection by sigmoid(logit) + e_score_correction_bias
([E+Z]), group-limited when n_group > 1 (groups over all E+Z), the selected sigmoid scores
renormalised (null slots included) and scaled by routed_scaling_factor. A null expert's output is
exactly zero and its weight is dropped; the shared expert is always added. ``use_zce_mask=True``
excludes the null experts: the original GLM routing. ``zce_logit_bias`` (the compute dial) is added
to the null experts' logits. Per-expert weight layout.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteForCausalLM, Glm4MoeLiteMLP

from .configuration_glm4_moe_lite_plus_plus import Glm4MoeLitePlusPlusConfig
from .zce_common import add_null_logit_bias, combine_real_experts, count_slots, register_stats_file
from .zce_common import num_zce as _num_zce
from .zeda_routing import select_experts


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
        self.zce_logit_bias = float(getattr(config, "zce_logit_bias", 0.0) or 0.0)
        self.gate = Glm4MoeLitePlusPlusRouter(config)
        self.experts = nn.ModuleList(
            [Glm4MoeLiteMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(self.num_experts)]
        )
        self.shared_experts = Glm4MoeLiteMLP(
            config=config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
        )

    def route(self, x):
        logits = F.linear(x.float(), self.gate.weight.float())
        bias = self.gate.e_score_correction_bias.float()
        if not self.use_zce_mask:
            logits = add_null_logit_bias(logits, self.num_experts, self.zce_logit_bias)
        if self.use_zce_mask and self.num_zce:
            bias = bias.clone()
            bias[self.num_experts:] = float("-inf")  # never chosen: the original routing
        groups = (self.n_group, self.topk_group) if self.n_group > 1 else (None, None)
        weights, index = select_experts(
            logits, topk=self.top_k, score_function="sigmoid", expert_bias=bias,
            scaling_factor=self.routed_scaling_factor, normalize_topk=self.norm_topk_prob,
            num_groups=groups[0], group_topk=groups[1],
        )
        return logits, weights.to(x.dtype), index

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.route(x)
        count_slots(self, index)
        out = combine_real_experts(x, self.experts, weights, index, self.num_experts)
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
        register_stats_file(self)


__all__ = ["Glm4MoeLitePlusPlusForCausalLM"]
