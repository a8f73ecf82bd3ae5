"""Model shapes and parameter counts from the HF config (no weights): whole-model counts, and per GPU
of each pipeline stage under a TP/EP/ETP/PP layout, in megatron-core 0.19.2's terms."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shapes:
    family: str  # qwen3_moe | glm4_moe_lite
    layers: int
    hidden: int
    vocab: int
    experts: int
    topk: int
    moe_ffn: int
    dense_ffn: int
    moe_layers: tuple  # 1 = MoE layer, 0 = dense, per layer
    tied: bool
    heads: int
    kv_heads: int
    head_dim: int
    shared_ffn: int = 0  # the shared expert's FFN width (0: none)
    q_lora: int = 0      # MLA (GLM): the query's low-rank width (0: a full query projection)
    kv_lora: int = 0     # MLA: the compressed KV latent's width (0: not MLA)
    qk_nope: int = 0     # MLA: per-head query/key width without RoPE
    qk_rope: int = 0     # MLA: per-head RoPE key width (shared by the heads)
    v_head: int = 0      # MLA: per-head value width

    @property
    def mla(self) -> bool:
        return bool(self.q_lora)


def shapes_of(hf: dict) -> Shapes:
    """The dimensions the plan needs, through the bridge's own reading of the HF config."""
    from zeda_megatron.bridge.hf_config import GLM, model_info

    info = model_info(hf)
    heads = int(hf["num_attention_heads"])
    common = dict(
        family=info.family, layers=info.num_layers, hidden=info.hidden_size, vocab=info.vocab_size,
        experts=info.num_experts, topk=int(hf["num_experts_per_tok"]), moe_ffn=int(hf["moe_intermediate_size"]),
        dense_ffn=int(hf["intermediate_size"]), moe_layers=tuple(info.moe_layers), tied=info.tie_word_embeddings,
        heads=heads,
    )
    if info.family == GLM:
        return Shapes(
            **common, kv_heads=heads, head_dim=int(hf["v_head_dim"]),
            shared_ffn=int(hf["moe_intermediate_size"]) * int(hf.get("n_shared_experts", 1) or 0),
            q_lora=int(hf["q_lora_rank"]), kv_lora=int(hf["kv_lora_rank"]), qk_nope=int(hf["qk_nope_head_dim"]),
            qk_rope=int(hf["qk_rope_head_dim"]), v_head=int(hf["v_head_dim"]),
        )
    return Shapes(**common, kv_heads=int(hf["num_key_value_heads"]),
                  head_dim=int(hf.get("head_dim") or info.hidden_size // heads))


def layer_params(s: Shapes, moe: bool, z: int, tp: int = 1, ep: int = 1, etp: int = 1) -> dict:
    """One decoder layer's parameters on one GPU: {"dense": n, "expert": n} (TP/EP-split)."""
    h = s.hidden
    dense = 2 * h  # input_layernorm + pre_mlp_layernorm (TE: fused into the next linear; same size)
    if s.mla:
        dense += h * s.q_lora + s.q_lora  # q_down (duplicated over TP) + q latent norm
        dense += h * (s.kv_lora + s.qk_rope) + s.kv_lora  # kv_down (duplicated) + kv latent norm
        dense += s.q_lora * s.heads * (s.qk_nope + s.qk_rope) // tp  # q_up
        dense += s.kv_lora * s.heads * (s.qk_nope + s.v_head) // tp  # kv_up
        dense += s.heads * s.v_head * h // tp  # linear_proj
    else:  # GQA with per-head QK norm (Qwen3)
        dense += h * (s.heads + 2 * s.kv_heads) * s.head_dim // tp  # linear_qkv
        dense += s.heads * s.head_dim * h // tp  # linear_proj
        dense += 2 * s.head_dim  # q_layernorm, k_layernorm
    expert = 0
    if moe:
        dense += (s.experts + z) * h  # router (replicated; E real + Z null rows)
        dense += 3 * s.shared_ffn * h // tp  # shared expert fc1 [gate; up] + fc2
        expert = (s.experts // ep) * 3 * s.moe_ffn * h // etp
    else:
        dense += 3 * s.dense_ffn * h // tp
    return {"dense": dense, "expert": expert}


def param_counts(hf: dict, num_null_experts: int = 0) -> dict:
    """Whole-model counts: ``original`` (what transformers' model has: parameters only, MTP layers
    excluded as transformers builds none), ``student`` (plus Z router rows per MoE layer), and the
    router bias buffers (GLM's e_score_correction_bias: E, the student's E+Z)."""
    s = shapes_of(hf)
    out = {}
    for name, z in (("original", 0), ("student", num_null_experts)):
        n = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden  # embedding, output layer, final norm
        for moe in s.moe_layers:
            p = layer_params(s, bool(moe), z)
            n += p["dense"] + p["expert"]
        out[name] = n
    n_moe = sum(s.moe_layers)
    bias = s.family == "glm4_moe_lite"
    out["original_router_bias"] = n_moe * s.experts if bias else 0
    out["student_router_bias"] = n_moe * (s.experts + num_null_experts) if bias else 0
    out["null_router_rows"] = n_moe * num_null_experts * s.hidden
    return out


def stage_layers(s: Shapes, pp: int, stage: int) -> tuple:
    """The MoE flags of the layers pipeline stage ``stage`` of ``pp`` holds."""
    per = s.layers // pp
    return s.moe_layers[stage * per:(stage + 1) * per]


def stage_params(s: Shapes, z: int, *, tp: int, pp: int, ep: int, etp: int) -> list[dict]:
    """Per pipeline stage: {"dense": n, "expert": n} parameters on one GPU of that stage."""
    out = []
    for i in range(pp):
        dense = expert = 0
        for moe in stage_layers(s, pp, i):
            p = layer_params(s, bool(moe), z, tp, ep, etp)
            dense += p["dense"]
            expert += p["expert"]
        vocab_part = s.vocab // tp * s.hidden
        if i == 0:
            dense += vocab_part  # embedding (vocab-parallel)
        if i == pp - 1:
            dense += s.hidden  # final norm
            if not s.tied or pp > 1:
                dense += vocab_part  # output layer (a tied one is a second copy on the last stage under PP)
        out.append({"dense": dense, "expert": expert})
    return out
