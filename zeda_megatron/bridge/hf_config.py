"""Hugging Face config -> megatron-core TransformerConfig for the two supported MoE families.

Supported ``model_type`` values (and their null-expert "++" variants written by the exporter):

* ``qwen3_moe`` (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B): GQA with per-head QK RMSNorm, softmax
  router; ``norm_topk_prob=True`` (renormalised top-k) maps to ``moe_router_pre_softmax=False``
  (softmax over the K selected logits, which is the same thing), ``False`` to ``pre_softmax=True``.
  Dense layers come from ``mlp_only_layers`` / ``decoder_sparse_step``.
* ``glm4_moe_lite`` (``Glm4MoeLiteForCausalLM``, GLM-4.7-Flash): multi-latent attention with its
  q/kv latent RMSNorms, sigmoid router with ``e_score_correction_bias`` (megatron's expert bias,
  frozen: update rate 0), ``routed_scaling_factor``, ``n_group``/``topk_group``, shared experts,
  first layer(s) dense (``mlp_layer_types`` / ``first_k_dense_replace``).

Megatron-Bridge (the NVIDIA library that has both mappings) was tried first and does not install in
this environment: it requires Python 3.12 and ``transformers<=5.12.1`` (we run Python 3.11 with
transformers 5.23.0 and megatron-core 0.19.2). ``mbridge`` pins older megatron-core. The mapping is
therefore written here, following the Bridge's choices for the config fields.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

QWEN3 = "qwen3_moe"
GLM = "glm4_moe_lite"
FAMILIES = (QWEN3, GLM)

# model_type / architecture of the null-expert ("++") exports, compatible with the reference release.
PLUS_PLUS_MODEL_TYPE = {QWEN3: "qwen3_moe_plus_plus", GLM: "glm4_moe_lite_plus_plus"}
PLUS_PLUS_ARCH = {QWEN3: "Qwen3MoePlusPlusForCausalLM", GLM: "Glm4MoeLitePlusPlusForCausalLM"}
STOCK_ARCH = {QWEN3: "Qwen3MoeForCausalLM", GLM: "Glm4MoeLiteForCausalLM"}
_FAMILY_OF = {QWEN3: QWEN3, GLM: GLM, "qwen3_moe_plus_plus": QWEN3, "glm4_moe_lite_plus_plus": GLM}


class BridgeError(ValueError):
    """A checkpoint or setting the bridge cannot convert; the message names the tensor/setting."""


@dataclass
class HFModelInfo:
    """What the bridge needs from an HF config, normalised across the two families."""

    family: str
    raw: dict  # config.json as read
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_experts: int  # real routed experts E
    num_null_experts: int  # Z already present in the checkpoint (a "++" export), else 0
    moe_layers: list[int]  # 1 = MoE layer, 0 = dense, per layer
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float


def read_config_json(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise BridgeError(f"no config.json in {hf_dir!r}: not a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def _rope(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in (None, "default"):
        raise BridgeError(
            f"rope_parameters.rope_type={rope_type!r} is not supported by the bridge (only 'default' "
            "RoPE is mapped); convert a checkpoint with plain RoPE or extend zeda_megatron/bridge/hf_config.py"
        )
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def model_info(cfg: dict) -> HFModelInfo:
    """Normalise an HF config.json dict; fail with a message naming the field for anything unsupported."""
    model_type = cfg.get("model_type")
    family = _FAMILY_OF.get(model_type)
    if family is None:
        raise BridgeError(
            f"config.json has model_type={model_type!r} (architectures={cfg.get('architectures')}); "
            f"the bridge supports {list(_FAMILY_OF)}"
        )
    n_layers = int(cfg["num_hidden_layers"])
    zce = cfg.get("zce_nums") or [0]
    if len(set(zce)) != 1:
        raise BridgeError(f"zce_nums={zce}: only one null-expert count for all layers is supported")
    zce_types = cfg.get("zce_types") or ["zero"]
    if any(t != "zero" for t in zce_types):
        raise BridgeError(f"zce_types={zce_types}: only 'zero' null experts are supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise BridgeError(f"hidden_act={cfg.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    if cfg.get("attention_bias"):
        raise BridgeError(
            "attention_bias=True is not supported by the bridge (megatron-core 0.19.2's multi-latent "
            "attention has no projection biases; the transformers defaults of both families are False)"
        )
    if family == QWEN3:
        num_experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)))
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        moe_layers = [
            int(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0) for i in range(n_layers)
        ]
        if cfg.get("use_sliding_window"):
            raise BridgeError("use_sliding_window=True is not supported for qwen3_moe by the bridge")
    else:
        num_experts = int(cfg.get("n_routed_experts", cfg.get("num_local_experts", 0)))
        types = cfg.get("mlp_layer_types")
        if types is None:
            k = int(cfg.get("first_k_dense_replace", 1))
            types = ["dense"] * k + ["sparse"] * (n_layers - k)
        if len(types) != n_layers:
            raise BridgeError(f"mlp_layer_types has {len(types)} entries, num_hidden_layers={n_layers}")
        moe_layers = [int(t == "sparse") for t in types]
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise BridgeError(f"glm4_moe_lite with scoring_func={cfg.get('scoring_func')!r}: only 'sigmoid' is supported")
        if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
            raise BridgeError(f"glm4_moe_lite with topk_method={cfg.get('topk_method')!r}: only 'noaux_tc' is supported")
    if num_experts < 1:
        raise BridgeError(f"{model_type}: expert count (num_experts / n_routed_experts) must be >= 1")
    return HFModelInfo(
        family=family,
        raw=cfg,
        num_layers=n_layers,
        hidden_size=int(cfg["hidden_size"]),
        vocab_size=int(cfg["vocab_size"]),
        num_experts=num_experts,
        num_null_experts=int(zce[0]),
        moe_layers=moe_layers,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=_rope(cfg),
    )


def transformer_config(info: HFModelInfo, *, params_dtype=torch.float32, mcore=None, **overrides):
    """Build the megatron-core TransformerConfig (MLATransformerConfig for GLM) for ``info``.

    ``mcore``: the user's ``model.mcore`` settings (any TransformerConfig field the bridge and the
    trainer do not set themselves), checked by :func:`check_mcore_settings`; on CPU the CUDA-only
    kernels among them are forced off. ``overrides`` are passed to the config last (parallel sizes,
    load-balancing settings, ...: the trainer's own settings).
    """
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    from zeda_megatron.platform import cpu_config_overrides

    user = check_mcore_settings(mcore, family=info.family)
    cfg = info.raw
    common = dict(
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        num_moe_experts=info.num_experts,
        moe_router_topk=int(cfg["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        moe_layer_freq=list(info.moe_layers),
        moe_token_dispatcher_type="alltoall",
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,  # model.mcore.moe_grouped_gemm (on in the GPU presets)
    )
    if info.family == QWEN3:
        common.update(
            num_query_groups=int(cfg["num_key_value_heads"]),
            kv_channels=int(cfg.get("head_dim") or info.hidden_size // int(cfg["num_attention_heads"])),
            qk_layernorm=True,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 1e-3)),
        )
        cls = TransformerConfig
    else:
        if not cfg.get("norm_topk_prob", True) and int(cfg["num_experts_per_tok"]) > 1:
            raise BridgeError(
                "glm4_moe_lite with norm_topk_prob=False is not supported: megatron-core's sigmoid "
                "router always renormalises the top-k weights"
            )
        n_group = int(cfg.get("n_group", 1) or 1)
        topk_group = int(cfg.get("topk_group", 1) or 1)
        topk = int(cfg["num_experts_per_tok"])
        if n_group > 1 and topk // topk_group != 2:
            raise BridgeError(
                f"n_group={n_group}, topk_group={topk_group}, num_experts_per_tok={topk}: HF scores a "
                "group by its top-2 experts, megatron-core by its top-(topk/topk_group); they agree only "
                "when num_experts_per_tok // topk_group == 2"
            )
        if cfg.get("q_lora_rank") is None:
            raise BridgeError(
                "glm4_moe_lite with q_lora_rank=None (no query compression) is not supported by the bridge"
            )
        n_heads = int(cfg["num_attention_heads"])
        if int(cfg.get("num_key_value_heads", n_heads)) != n_heads:
            raise BridgeError("glm4_moe_lite with num_key_value_heads != num_attention_heads is not supported")
        common.update(
            num_query_groups=n_heads,
            kv_channels=int(cfg["v_head_dim"]),
            qk_layernorm=True,  # the q/kv latent RMSNorms
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_pos_emb_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            rope_type="rope",
            rotary_base=info.rope_theta,
            rotary_scaling_factor=1.0,
            mscale=1.0,
            mscale_all_dim=0.0,
            moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False,
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,
            moe_router_topk_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            moe_router_num_groups=n_group if n_group > 1 else None,
            moe_router_group_topk=topk_group if n_group > 1 else None,
            moe_shared_expert_intermediate_size=int(cfg["moe_intermediate_size"])
            * int(cfg.get("n_shared_experts", 1) or 0)
            or None,
            moe_router_load_balancing_type="seq_aux_loss",
            moe_aux_loss_coeff=1e-3,
        )
        cls = MLATransformerConfig
    common.update(user)
    forced = cpu_config_overrides()
    dropped = sorted(k for k, v in user.items() if k in forced and v != forced[k])
    if dropped:
        log.warning(
            "model.mcore: %s need CUDA / Transformer Engine: forced off on the CPU platform",
            ", ".join(f"{k}={user[k]!r}" for k in dropped),
        )
    common.update(forced)
    common.update(overrides)
    return cls(**common)


# ---- model.mcore: TransformerConfig fields from the run config ------------------------------------
# Fields the bridge derives from the HF config: they define the checkpoint's architecture.
ARCHITECTURE_FIELDS = frozenset({
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func", "add_bias_linear",
    "add_qkv_bias", "qk_layernorm", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_layer_freq", "moe_router_score_function", "moe_router_pre_softmax", "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate", "moe_router_topk_scaling_factor", "moe_router_num_groups",
    "moe_router_group_topk", "moe_shared_expert_intermediate_size", "q_lora_rank", "kv_lora_rank",
    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_base", "rotary_scaling_factor",
    "mscale", "mscale_all_dim", "multi_latent_attention", "vocab_size", "position_embedding_type",
    "rotary_percent", "original_max_position_embeddings", "beta_fast", "beta_slow",
})
# Fields the trainer sets from another config key (the key to use instead).
MANAGED_FIELDS = {
    "tensor_model_parallel_size": "parallel.tp",
    "pipeline_model_parallel_size": "parallel.pp",
    "expert_model_parallel_size": "parallel.ep",
    "expert_tensor_parallel_size": "parallel.etp",
    "sequence_parallel": "parallel.sequence_parallel",
    "params_dtype": "trainer.precision",
    "pipeline_dtype": "trainer.precision",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "recompute_granularity": "trainer.recompute",
    "recompute_method": "trainer.recompute",
    "recompute_num_layers": "trainer.recompute",
    "moe_aux_loss_coeff": "model.group_loss_coeff",
    "moe_router_load_balancing_type": "model.group_loss_coeff (the group balance loss of the null experts)",
    "calculate_per_token_loss": "nothing (the trainer's losses are per token)",
    "moe_enable_routing_replay": "stage.router_replay",
    "use_cpu_initialization": "nothing (set by the platform)",
}


def _off(v) -> bool:
    return v is None or v is False or v == 0 or (isinstance(v, str) and v.lower() in ("none", "", "false"))


# Settings the null-expert layer does not support: key -> (is the value refused?, why).
UNSUPPORTED_WITH_NULL_EXPERTS = {
    **{k: (lambda v: not _off(v), "FP8/FP4 training is not supported with null experts (untested with "
           "null-thinned, unpadded per-expert token counts); train in bf16 (trainer.precision=bf16)")
       for k in ("fp8", "fp8_recipe", "fp8_param", "fp4", "fp4_recipe", "fp4_param", "fp8_dot_product_attention",
                 "fp8_multi_head_attention", "moe_router_padding_for_fp8", "moe_router_padding_for_quantization")},
    **{k: (lambda v: not _off(v), "CUDA graphs need static shapes, and null experts make the rows each "
           "expert receives change every step")
       for k in ("enable_cuda_graph", "external_cuda_graph", "moe_pad_experts_for_cuda_graph_inference")},
    "cuda_graph_impl": (lambda v: not _off(v) and v != "none", "CUDA graphs need static shapes, and null "
                        "experts make the rows each expert receives change every step"),
    "moe_expert_capacity_factor": (lambda v: v is not None, "expert capacity / token dropping assumes K real "
                                   "slots per token; the null-expert layer is dropless"),
    "moe_pad_expert_input_to_capacity": (lambda v: bool(v), "expert capacity / token dropping assumes K real "
                                         "slots per token; the null-expert layer is dropless"),
    "moe_token_dropping": (lambda v: bool(v), "token dropping is not supported with null experts"),
    "moe_expert_rank_capacity_factor": (lambda v: v is not None, "expert capacity is not supported with null experts"),
    "moe_token_dispatcher_type": (lambda v: v not in ("alltoall", "allgather"),
                                  "only the alltoall and allgather dispatchers move null-thinned tokens "
                                  "(the flex/DeepEP/HybridEP dispatchers are not supported)"),
    "moe_enable_deepep": (lambda v: bool(v), "the DeepEP dispatcher is not supported with null experts"),
    "moe_flex_dispatcher_backend": (lambda v: not _off(v) and v != "deepep",
                                    "the flex dispatcher is not supported with null experts"),
    "overlap_moe_expert_parallel_comm": (lambda v: bool(v), "EP communication overlap needs megatron's "
                                         "combined 1F1B schedule, which the co-located teacher does not run"),
    "moe_router_force_load_balancing": (lambda v: bool(v), "forced (random) routing would ignore the null experts"),
    "moe_paged_stash": (lambda v: bool(v), "paged stash is not supported with null experts"),
    "mtp_num_layers": (lambda v: not _off(v), "multi-token prediction layers are not built or imported by "
                       "the bridge (GLM-4.7-Flash's MTP layer is dropped)"),
    "moe_latent_size": (lambda v: v is not None, "latent MoE changes the architecture; not supported"),
}


class MCoreSettingError(BridgeError):
    """A model.mcore key that is unknown, managed elsewhere or unsupported with null experts."""


def transformer_config_fields(family: str | None = None) -> set[str]:
    from dataclasses import fields

    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    cls = MLATransformerConfig if family in (None, GLM) else TransformerConfig
    return {f.name for f in fields(cls) if f.init}


def check_mcore_settings(mcore, family: str | None = None) -> dict:
    """Check ``model.mcore`` (a mapping of TransformerConfig field -> value) and return it as a plain
    dict. Raises :class:`MCoreSettingError` naming the key for an unknown field, a field set from the
    HF config or by the trainer, or a setting the null-expert layer does not support. Cheap: reads the
    dataclass fields only, builds nothing."""
    if mcore is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(mcore):
            mcore = OmegaConf.to_container(mcore, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(mcore, dict):
        raise MCoreSettingError(f"model.mcore must be a mapping of TransformerConfig fields, got {mcore!r}")
    known = transformer_config_fields(family)
    unknown = sorted(k for k in mcore if k not in known)
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f"model.mcore.{k}" + (f" (did you mean {close[0]}?)" if close else ""))
        what = "MLATransformerConfig" if family == GLM else "TransformerConfig"
        raise MCoreSettingError(
            f"unknown megatron-core setting {', '.join(hints)}: not a field of {what} (megatron-core "
            "0.19.2); model.mcore passes TransformerConfig fields through"
        )
    for k, v in mcore.items():
        if k in ARCHITECTURE_FIELDS:
            raise MCoreSettingError(
                f"model.mcore.{k} is set from the model's HF config (model.hf_config / hf_dir config.json): "
                "it defines the checkpoint's architecture; remove it from model.mcore"
            )
        if k in MANAGED_FIELDS:
            raise MCoreSettingError(f"model.mcore.{k} is set by the trainer: use {MANAGED_FIELDS[k]} instead")
        if k in UNSUPPORTED_WITH_NULL_EXPERTS:
            refused, why = UNSUPPORTED_WITH_NULL_EXPERTS[k]
            if refused(v):
                raise MCoreSettingError(f"model.mcore.{k}={v!r} is not supported with null experts: {why}")
    return dict(mcore)


# HF q_a_layernorm / kv_a_layernorm are built with their class default eps (1e-6), not rms_norm_eps.
GLM_LATENT_NORM_EPS = 1e-6
