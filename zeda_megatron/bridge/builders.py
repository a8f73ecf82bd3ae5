"""Build megatron-core GPT models for the supported HF families from a config alone.

Call after :func:`zeda_megatron.distributed.init_parallel` (the model is built for this rank's
TP/PP/EP position). Null experts come from :class:`zeda_megatron.mcore.config.NullExpertSettings`.
"""

from __future__ import annotations

import torch

from zeda_megatron.bridge.hf_config import (
    GLM,
    GLM_LATENT_NORM_EPS,
    BridgeError,
    HFModelInfo,
    model_info,
    read_config_json,
    transformer_config,
)


def check_layout(info: HFModelInfo, *, tp: int, ep: int, pp: int) -> None:
    """Errors naming the setting for layouts this checkpoint cannot be split into (the rules:
    :func:`zeda_megatron.layout.check_layout`)."""
    from zeda_megatron.layout import LayoutError
    from zeda_megatron.layout import check_layout as _check

    try:
        _check(tp=tp, ep=ep, pp=pp, hf_config=info.raw, training=False)
    except LayoutError as e:
        raise BridgeError(str(e)) from e


def build_model(
    source,
    null=None,
    *,
    params_dtype=torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_overrides,
):
    """Build this rank's megatron-core GPTModel for an HF directory, config dict or HFModelInfo.

    ``null``: NullExpertSettings (or None for the stock layer). Returns ``(model, info, config)``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from zeda_megatron.mcore.specs import gpt_block_spec
    from zeda_megatron.platform import setup_platform

    setup_platform()
    if isinstance(source, HFModelInfo):
        info = source
    elif isinstance(source, dict):
        info = model_info(source)
    else:
        info = model_info(read_config_json(str(source)))
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    check_layout(info, tp=tp, ep=ep, pp=pp)
    overrides = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        pipeline_dtype=params_dtype if pp > 1 else None,
        sequence_parallel=False,
    )
    overrides.update(config_overrides)
    config = transformer_config(info, params_dtype=params_dtype, **overrides)
    if null is not None:
        from zeda_megatron.mcore.config import validate

        validate(config, null, ep_size=ep)
    spec = gpt_block_spec(config, null, vp_stage=vp_stage)
    virtual = vp_stage is not None
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=info.vocab_size,
        max_sequence_length=info.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=info.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=info.rope_theta,
        vp_stage=vp_stage,
    )
    if info.family == GLM:
        # HF builds q_a_layernorm / kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says.
        # (With Transformer Engine the norms live inside linear_{q,kv}_up_proj, which also have .eps.)
        for layer in model.decoder.layers:
            attn = layer.self_attention
            for mod in ("q_layernorm", "kv_layernorm", "linear_q_up_proj", "linear_kv_up_proj"):
                norm = getattr(attn, mod, None)
                if norm is not None and hasattr(norm, "eps") and (
                    mod.endswith("layernorm") or hasattr(norm, "layer_norm_weight")
                ):
                    norm.eps = GLM_LATENT_NORM_EPS
    from zeda_megatron.platform import on_cpu

    if not on_cpu():
        # megatron-core creates some tensors on the host (the router weight, buffers registered from
        # it: our routing counters): move the whole model to this rank's GPU, as Megatron-LM's get_model does
        model.cuda(torch.cuda.current_device())
    model.zeda_hf_info = info
    model.zeda_null = null
    return model, info, config
