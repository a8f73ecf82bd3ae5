"""The training model as the sampler sees it: unwrapping, settings checks, decoding mode."""

from __future__ import annotations

import contextlib

from zeda_megatron.distributed import comm_device


def unwrap(model):
    """The GPTModel inside DDP / Float16Module / wrapper modules (anything with ``.module``)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def moe_routers(model) -> list:
    """The model's TopKRouters in construction (= layer) order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in unwrap(model).modules() if isinstance(m, TopKRouter)]


def check_inference_settings(model) -> None:
    """Refuse megatron-core inference options that conflict with the null-expert layer."""
    config = unwrap(model).config
    if getattr(config, "transformer_impl", None) == "inference_optimized":
        raise ValueError(
            "transformer_impl='inference_optimized' cannot sample with these models: megatron-core's "
            "inference-optimised MoE rejects gated (SwiGLU) experts and installs its own token dispatcher "
            "while InferenceMode is active, bypassing the null-aware one; keep the training implementation"
        )
    if getattr(config, "flash_decode", False) and comm_device().type == "cpu":
        raise ValueError("flash_decode needs CUDA kernels; turn it off on CPU")
    from zeda_megatron.mcore.dispatcher import NullAwareAllGatherDispatcher, NullAwareAlltoAllDispatcher
    from zeda_megatron.mcore.moe_layer import NullExpertMoELayer

    for m in unwrap(model).modules():
        if isinstance(m, NullExpertMoELayer) and not isinstance(
            m.token_dispatcher, (NullAwareAlltoAllDispatcher, NullAwareAllGatherDispatcher)
        ):
            raise RuntimeError(f"MoE layer {m.layer_number} lost its null-aware dispatcher "
                               f"({type(m.token_dispatcher).__name__})")


@contextlib.contextmanager
def routing_counters_kept(model):
    """Sampling forwards do not count in the null-share/rows-sent counters read after training."""
    from zeda_megatron.mcore.specs import moe_layers

    saved = []
    for layer in moe_layers(unwrap(model)):
        bufs = [getattr(layer.router, n) for n in ("stat_tokens", "stat_null_slots", "stat_real_assignments")]
        bufs.append(layer.token_dispatcher.stat_rows_sent)
        saved.append((bufs, [b.clone() for b in bufs]))
    try:
        yield
    finally:
        for bufs, vals in saved:
            for b, v in zip(bufs, vals):
                b.copy_(v)


@contextlib.contextmanager
def decoding_mode(model):
    """Eval mode and sequence parallelism off for the duration (both restored): a decode step feeds
    a handful of tokens, which cannot be split over TP."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    gpt = unwrap(model)
    was_training, sp = gpt.training, bool(gpt.config.sequence_parallel)
    gpt.eval()
    if sp:
        set_model_to_sequence_parallel(gpt, False)
    try:
        yield gpt
    finally:
        if sp:
            set_model_to_sequence_parallel(gpt, True)
        gpt.train(was_training)


@contextlib.contextmanager
def recording_routing(routers):
    """RouterReplay in RECORD mode on ``routers`` for the duration (cleared after)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for r in routers:
        r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield
    finally:
        for r in routers:
            r.router_replay.clear_router_replay_action()
            r.router_replay.clear_indices()
