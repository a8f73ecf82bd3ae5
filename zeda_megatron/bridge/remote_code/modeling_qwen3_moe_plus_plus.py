"""Qwen3-MoE with zero-computation (null) experts.

The router scores E real + Z null experts; top-k runs over all E+Z; a null expert's output is
exactly zero, and its routing weight is dropped (not given back to the real experts). With
``norm_topk_prob`` the K selected weights are renormalised among themselves, null slots included.
``use_zce_mask=True`` sets the null logits to -inf: the original Qwen3-MoE routing; otherwise
``zce_logit_bias`` (the compute dial) is added to them.
Weights use the per-expert layout (``mlp.experts.{e}.gate_proj.weight``) of released checkpoints.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeMLP

from .configuration_qwen3_moe_plus_plus import Qwen3MoePlusPlusConfig
from .zce_common import add_null_logit_bias, combine_real_experts, count_slots, register_stats_file
from .zce_common import num_zce as _num_zce
from .zeda_routing import select_experts


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
        self.zce_logit_bias = float(getattr(config, "zce_logit_bias", 0.0) or 0.0)
        self.gate = Qwen3MoePlusPlusRouter(config)
        self.experts = nn.ModuleList(
            [Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(self.num_experts)]
        )

    def route(self, x):
        logits = F.linear(x.float(), self.gate.weight.float())
        if self.use_zce_mask and self.num_zce:
            logits[:, self.num_experts:] = float("-inf")
        else:
            logits = add_null_logit_bias(logits, self.num_experts, self.zce_logit_bias)
        weights, index = select_experts(logits, topk=self.top_k, score_function="softmax",
                                        normalize_topk=self.norm_topk_prob)
        return logits, weights.to(x.dtype), index

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.route(x)
        count_slots(self, index)
        return combine_real_experts(x, self.experts, weights, index, self.num_experts).reshape(shape)


class Qwen3MoePlusPlusForCausalLM(Qwen3MoeForCausalLM):
    config_class = Qwen3MoePlusPlusConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            if not isinstance(layer.mlp, Qwen3MoeMLP):  # a sparse layer
                layer.mlp = Qwen3MoePlusPlusSparseMoeBlock(config)
        self.post_init()
        register_stats_file(self)


__all__ = ["Qwen3MoePlusPlusForCausalLM"]
