"""Core attention for megatron-core's local (non-Transformer-Engine) spec, on torch SDPA.

megatron-core's local ``DotProductAttention`` assumes one head dim for q, k and v and has no
``k_channels``/``v_channels`` arguments, which multi-latent attention passes (GLM-4.7-Flash: q/k
head dim 192+64, v head dim 256). This module accepts both, handles GQA, and needs no explicit
causal mask (megatron's default causal mask is allocated on CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """q [sq, b, np, hk], k [sk, b, ng, hk], v [sk, b, ng, hv] -> [sq, b, np * hv]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the TE spec on GPU")
        self.attn_mask_type = attn_mask_type
        k_channels = k_channels or config.kv_channels
        self.hidden_size_per_attention_head_v = v_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: only thd is supported")
            return self._forward_thd(query, key, value, packed_seq_params)
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:  # GQA: repeat kv groups to the query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # megatron masks are True where attention is NOT allowed; SDPA's are True where it is.
        mask = None if attention_mask is None else ~attention_mask.bool()
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal, scale=self.softmax_scale,
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _forward_thd(self, query, key, value, params):
        """Packed documents (thd: q [t, np, hk], k/v [t, ng, h]): causal attention inside each
        ``cu_seqlens`` segment only, one SDPA call per segment -> [t, np * hv]."""
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        q, k, v = (t.permute(1, 0, 2) for t in (query, key, value))  # [heads, t, d]
        if k.shape[0] != q.shape[0]:
            rep = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        bounds = cu.tolist()
        p = self.dropout_p if self.training else 0.0
        outs = [F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], dropout_p=p, is_causal=True,
                                               scale=self.softmax_scale)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        out = torch.cat(outs, dim=1)  # [np, t, hv]
        return out.permute(1, 0, 2).reshape(query.shape[0], -1)
