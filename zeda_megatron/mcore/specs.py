"""Turn megatron-core GPT specs into their null-expert versions.

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True)   # any stock spec
    spec = with_null_experts(spec, NullExpertSettings(num_null_experts=32, null_weight=2.0))
    model = GPTModel(config, transformer_layer_spec=spec, ...)

Dense layers, attention (GQA or MLA), shared experts and the experts implementation (SequentialMLP
or TE grouped GEMM) are kept; only each MoE layer's builder is swapped for
:class:`NullExpertMoELayer`. :func:`gpt_block_spec` additionally picks the backend (Transformer
Engine on GPU, local modules + SDPA core attention on the CPU platform).
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from zeda_megatron.mcore.config import NullExpertSettings
from zeda_megatron.mcore.moe_layer import NullExpertMoELayer
from zeda_megatron.routing import num_null_from_ratio


def settings_from(num_real: int, *, num_null_experts: int | None = None, null_ratio: float | None = None,
                  null_weight: float = 1.0, mask_null_experts: bool = False) -> NullExpertSettings:
    """Settings from Z or from a ratio Z/E (exactly one of them)."""
    if (num_null_experts is None) == (null_ratio is None):
        raise ValueError("give exactly one of num_null_experts (Z) or null_ratio (Z/E)")
    z = num_null_experts if num_null_experts is not None else num_null_from_ratio(num_real, null_ratio)
    return NullExpertSettings(num_null_experts=z, null_weight=null_weight, mask_null_experts=mask_null_experts)


def null_moe_spec(mlp, null: NullExpertSettings):
    """The null-expert version of one MLP builder: a stock MoELayer partial/ModuleSpec becomes a
    NullExpertMoELayer partial; a dense MLP spec is returned unchanged."""
    if isinstance(mlp, partial) and isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer):
        if issubclass(mlp.func, NullExpertMoELayer):
            return partial(mlp.func, *mlp.args, **{**mlp.keywords, "null": null})
        if mlp.func is not MoELayer:
            raise TypeError(f"cannot add null experts to a custom MoE layer class {mlp.func.__name__}")
        return partial(NullExpertMoELayer, *mlp.args, **{**mlp.keywords, "null": null})
    if isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer):
        return partial(NullExpertMoELayer, submodules=mlp.submodules, **(mlp.params or {}), null=null)
    return mlp  # dense MLP: unchanged


def _layer_with(layer_spec: ModuleSpec, null: NullExpertSettings, core_attention=None) -> ModuleSpec:
    layer_spec = copy.copy(layer_spec)
    subs = copy.copy(layer_spec.submodules)
    subs.mlp = null_moe_spec(subs.mlp, null)
    if core_attention is not None and isinstance(subs.self_attention, ModuleSpec):
        attn = copy.copy(subs.self_attention)
        attn.submodules = dataclasses.replace(attn.submodules, core_attention=core_attention)
        subs.self_attention = attn
    layer_spec.submodules = subs
    return layer_spec


def with_null_experts(spec, null: NullExpertSettings, *, core_attention=None):
    """Return a copy of a GPT layer spec (ModuleSpec), a list of them, or a
    TransformerBlockSubmodules in which every MoE layer has ``null.num_null_experts`` null experts.
    ``core_attention`` optionally replaces each layer's core attention builder."""
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(
            spec, layer_specs=[_layer_with(s, null, core_attention) for s in spec.layer_specs]
        )
    if isinstance(spec, (list, tuple)):
        return [_layer_with(s, null, core_attention) for s in spec]
    return _layer_with(spec, null, core_attention)


def gpt_block_spec(config, null: NullExpertSettings | None = None, *, use_te: bool | None = None,
                   vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """The GPT decoder block spec for ``config`` (dense + MoE layers per ``moe_layer_freq``, GQA
    or MLA per ``multi_latent_attention``) with null experts. ``use_te`` defaults to True on GPU
    when Transformer Engine is installed; the local spec uses :class:`SDPACoreAttention`."""
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from zeda_megatron.mcore.attention import SDPACoreAttention
    from zeda_megatron.platform import on_cpu

    if use_te is None:
        use_te = HAVE_TE and not on_cpu()
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization,
        vp_stage=vp_stage, pp_rank=pp_rank,
    )
    if not use_te and config.multi_latent_attention and config.tensor_model_parallel_size > 1:
        spec = _duplicated_mla_down_projections(spec)
    return with_null_experts(spec, null or NullExpertSettings(), core_attention=None if use_te else SDPACoreAttention)


def _duplicated_mla_down_projections(spec: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """The local MLA spec builds linear_q_down_proj / linear_kv_down_proj as ColumnParallelLinear and
    all-gathers their output; that gather's backward only splits, so the rope-key gradient each TP
    rank holds in part is never summed over TP (gradients silently wrong at TP > 1). Use a
    TP-replicated ("duplicated") Linear for both, as the Transformer Engine spec does (TELinear,
    parallel_mode='duplicated'); under sequence parallelism MLA then gathers the rope key over the
    sequence, whose backward reduce-scatter sums it."""
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.Linear is None:
        raise ValueError(
            "multi-latent attention at tensor_model_parallel_size > 1 on the local (non-Transformer-"
            "Engine) spec needs megatron-core's duplicated Linear, which it enables only with "
            "Transformer Engine installed; use the TE spec on GPU (zeda_megatron.platform supplies it on CPU)"
        )
    layers = []
    for layer in spec.layer_specs:
        attn = layer.submodules.self_attention
        if isinstance(attn, ModuleSpec) and hasattr(attn.submodules, "linear_kv_down_proj"):
            layer, subs = copy.copy(layer), copy.copy(layer.submodules)
            attn = copy.copy(attn)
            attn.submodules = dataclasses.replace(
                attn.submodules, linear_q_down_proj=mla.Linear, linear_kv_down_proj=mla.Linear
            )
            subs.self_attention = attn
            layer.submodules = subs
        layers.append(layer)
    return dataclasses.replace(spec, layer_specs=layers)


def moe_layers(model):
    """The null-expert MoE layers of a model, in order."""
    return [m for m in model.modules() if isinstance(m, NullExpertMoELayer)]


def routing_stats(model, reset: bool = False) -> dict:
    """Per-layer and overall counters of a model's null-expert MoE layers: THIS rank's non-pad
    tokens, not reduced (under sequence parallelism each TP rank routes its own s/TP slice; with
    TP > 1 and SP off only TP rank 0 counts). Sum them over all ranks to count each token once.

    Returns {"layers": {layer_number: stats}, "null_share": overall, "real_assignments": ...,
    "rows_sent": ..., "tokens": ...}."""
    layers = {}
    for layer in moe_layers(model):
        layers[layer.layer_number] = layer.routing_stats()
        if reset:
            layer.reset_routing_stats()
    tot = {k: sum(s[k] for s in layers.values()) for k in ("tokens", "null_slots", "real_assignments", "rows_sent")}
    slots = sum(s["real_assignments"] + s["null_slots"] for s in layers.values())
    tot["null_share"] = tot["null_slots"] / slots if slots else 0.0
    return {"layers": layers, **tot}
