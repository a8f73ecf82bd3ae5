"""Name and layout mapping between megatron-core GPTModel state dicts and HF checkpoints.

Written here because Megatron-Bridge does not install in this environment (Python 3.12 and
``transformers<=5.12.1`` required); the tensor layouts follow megatron-core 0.19.2:

* GQA ``linear_qkv.weight``: per query group ``g``: [q heads of g; k_g; v_g] (rows), HF keeps
  ``q_proj``/``k_proj``/``v_proj`` separate.
* SwiGLU ``linear_fc1.weight`` = [gate; up] (``gate_proj``, ``up_proj``); under TP each rank holds
  [gate shard; up shard].
* MLA: ``linear_q_down_proj``=``q_a_proj``, ``q_layernorm``=``q_a_layernorm``,
  ``linear_q_up_proj``=``q_b_proj``, ``linear_kv_down_proj``=``kv_a_proj_with_mqa``,
  ``kv_layernorm``=``kv_a_layernorm``, ``linear_kv_up_proj``=``kv_b_proj``. megatron-core's MLA
  RoPE is the DeepSeek interleaved one (``rope_interleave=True`` in HF, GLM-4.7-Flash's setting); for
  ``rope_interleave=False`` the rope rows are permuted at import (and back at export).
* Transformer Engine spec names (GPU) are mapped too: norms fused into the following linear
  (``linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``,
  ``linear_q_up_proj.layer_norm_weight``, ``linear_kv_up_proj.layer_norm_weight``) and grouped-GEMM
  experts (``mlp.experts.linear_fc1.weight{i}``). These are not exercised by the CPU tests.
* MoE: ``router.weight`` [E+Z, H] = ``mlp.gate.weight`` (+ Z null rows), ``router.expert_bias`` [E]
  and ``router.null_expert_bias`` [Z] = ``mlp.gate.e_score_correction_bias`` [E(+Z)], experts from
  either the per-expert keys (``mlp.experts.{e}.gate_proj.weight``, what released checkpoints and
  transformers' save_pretrained write) or the fused 3D keys (``mlp.experts.gate_up_proj`` [E, 2F, H],
  ``mlp.experts.down_proj`` [E, H, F]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from zeda_megatron.bridge.hf_config import GLM, BridgeError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.linear_fc([12])\.weight(\d+)$")


@dataclass
class Entry:
    """How one megatron tensor relates to HF tensors.

    kind: copy | qkv | fc1 | expert_fc1 | expert_fc2 | router | expert_bias | null_expert_bias
    hf: the HF keys (prefix for experts); layer/expert: global indices; fc1 says whether TP
    shards gate and up separately; expert_param says which TP group shards it.
    """

    kind: str
    hf: list[str]
    layer: int | None = None
    expert: int | None = None
    fc1: bool = False
    expert_param: bool = False
    rope_rows: tuple | None = None  # (rows per head, nope dim, rope dim) for MLA rope permutation
    meta: dict = field(default_factory=dict)


def resolve(local_name: str, model, info) -> Entry | None:
    """Map one key of ``model.state_dict()`` to its Entry; None for keys with no HF counterpart
    (``_extra_state``). Raises BridgeError for a tensor the bridge does not know."""
    if local_name.endswith("_extra_state"):
        return None
    cfg = info.raw
    if local_name == "embedding.word_embeddings.weight":
        return Entry("copy", ["model.embed_tokens.weight"])
    if local_name == "output_layer.weight":
        return Entry("copy", ["lm_head.weight"], meta={"tied_fallback": "model.embed_tokens.weight"})
    if local_name == "decoder.final_layernorm.weight":
        return Entry("copy", ["model.norm.weight"])
    m = _LAYER.match(local_name)
    if m is None:
        raise BridgeError(f"megatron tensor {local_name!r} has no Hugging Face mapping in the bridge")
    layer_mod = model.decoder.layers[int(m.group(1))]
    g = layer_mod.layer_number - 1  # global, 0-based
    rest = m.group(2)
    p = f"model.layers.{g}."
    a, mp = p + "self_attn.", p + "mlp."
    if info.family == GLM and not cfg.get("rope_interleave", True):
        nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        if rest in ("self_attention.linear_q_up_proj.weight", "self_attention.linear_q_proj.weight"):
            return Entry("copy", [a + ("q_b_proj.weight" if "up" in rest else "q_proj.weight")], layer=g,
                         rope_rows=(nope + rope, nope, rope))
        if rest == "self_attention.linear_kv_down_proj.weight":
            return Entry("copy", [a + "kv_a_proj_with_mqa.weight"], layer=g,
                         rope_rows=(int(cfg["kv_lora_rank"]) + rope, int(cfg["kv_lora_rank"]), rope))
    named = {  # megatron name in the layer -> (kind, HF names)
        "input_layernorm.weight": ("copy", [p + "input_layernorm.weight"]),
        # local / TE-fused
        "pre_mlp_layernorm.weight": ("copy", [p + "post_attention_layernorm.weight"]),
        "mlp.linear_fc1.layer_norm_weight": ("copy", [p + "post_attention_layernorm.weight"]),
        # TE: input norm fused into qkv
        "self_attention.linear_qkv.layer_norm_weight": ("copy", [p + "input_layernorm.weight"]),
        "self_attention.linear_proj.weight": ("copy", [a + "o_proj.weight"]),
        "self_attention.q_layernorm.weight": (
            "copy", [a + ("q_a_layernorm.weight" if info.family == GLM else "q_norm.weight")]),
        "self_attention.k_layernorm.weight": ("copy", [a + "k_norm.weight"]),
        "self_attention.linear_q_down_proj.weight": ("copy", [a + "q_a_proj.weight"]),
        "self_attention.kv_layernorm.weight": ("copy", [a + "kv_a_layernorm.weight"]),
        # Transformer Engine spec: the latent norms are fused into the up projections
        "self_attention.linear_q_up_proj.layer_norm_weight": ("copy", [a + "q_a_layernorm.weight"]),
        "self_attention.linear_kv_up_proj.layer_norm_weight": ("copy", [a + "kv_a_layernorm.weight"]),
        "self_attention.linear_kv_up_proj.weight": ("copy", [a + "kv_b_proj.weight"]),
        "self_attention.linear_q_up_proj.weight": ("copy", [a + "q_b_proj.weight"]),
        "self_attention.linear_q_proj.weight": ("copy", [a + "q_proj.weight"]),
        "self_attention.linear_kv_down_proj.weight": ("copy", [a + "kv_a_proj_with_mqa.weight"]),
        "self_attention.linear_qkv.weight": ("qkv", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),
        "mlp.linear_fc1.weight": ("fc1", [mp + "gate_proj.weight", mp + "up_proj.weight"]),
        "mlp.linear_fc2.weight": ("copy", [mp + "down_proj.weight"]),
        "mlp.shared_experts.linear_fc1.weight": (
            "fc1", [mp + "shared_experts.gate_proj.weight", mp + "shared_experts.up_proj.weight"]),
        "mlp.shared_experts.linear_fc2.weight": ("copy", [mp + "shared_experts.down_proj.weight"]),
        "mlp.router.weight": ("router", [mp + "gate.weight"]),
        "mlp.router.expert_bias": ("expert_bias", [mp + "gate.e_score_correction_bias"]),
        "mlp.router.null_expert_bias": ("null_expert_bias", [mp + "gate.e_score_correction_bias"]),
    }
    if rest in named:
        kind, hf = named[rest]
        return Entry(kind, hf, layer=g, fc1=kind == "fc1")
    em = _SEQ_EXPERT.match(rest)
    if em is not None:
        local, which = int(em.group(1)), em.group(2)
    else:
        em = _TE_EXPERT.match(rest)
        if em is not None:
            which, local = em.group(1), int(em.group(2))
    if em is not None:
        experts = layer_mod.mlp.experts
        n_local = getattr(experts, "num_local_experts", None) or len(experts.local_experts)
        from megatron.core import parallel_state as ps

        e = ps.get_expert_model_parallel_rank() * n_local + local
        kind = "expert_fc1" if which == "1" else "expert_fc2"
        return Entry(kind, [mp + "experts."], layer=g, expert=e, fc1=which == "1", expert_param=True)
    raise BridgeError(f"megatron tensor {local_name!r} (HF layer {g}) has no Hugging Face mapping in the bridge")


def rope_to_mcore(t: torch.Tensor, rows: tuple) -> torch.Tensor:
    """HF non-interleaved rope rows -> megatron MLA's interleaved convention (per head block)."""
    per, nope, rope = rows
    x = t.reshape(-1, per, *t.shape[1:]).clone()
    r = x[:, nope:]
    half = rope // 2
    out = torch.empty_like(r)
    out[:, 0::2], out[:, 1::2] = r[:, :half], r[:, half:]
    x[:, nope:] = out
    return x.reshape(t.shape)


def rope_to_hf(t: torch.Tensor, rows: tuple) -> torch.Tensor:
    per, nope, rope = rows
    x = t.reshape(-1, per, *t.shape[1:]).clone()
    r = x[:, nope:]
    x[:, nope:] = torch.cat([r[:, 0::2], r[:, 1::2]], dim=1)
    return x.reshape(t.shape)


def qkv_to_mcore(q, k, v, num_heads: int, num_groups: int) -> torch.Tensor:
    d = q.shape[0] // num_heads
    rep = num_heads // num_groups
    q = q.reshape(num_groups, rep * d, -1)
    k = k.reshape(num_groups, d, -1)
    v = v.reshape(num_groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def qkv_to_hf(qkv, num_heads: int, num_groups: int):
    rep = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (rep + 2))
    x = qkv.reshape(num_groups, (rep + 2) * d, -1)
    q, k, v = torch.split(x, [rep * d, d, d], dim=1)
    h = qkv.shape[-1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)
