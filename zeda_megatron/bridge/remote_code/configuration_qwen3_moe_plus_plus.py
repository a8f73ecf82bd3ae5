"""Qwen3-MoE with zero-computation (null) experts: configuration."""

from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

try:
    from huggingface_hub.dataclasses import strict
except ImportError:  # older huggingface_hub: plain subclass
    def strict(cls):
        return cls


@strict
class Qwen3MoePlusPlusConfig(Qwen3MoeConfig):
    """``Qwen3MoeConfig`` plus ``zce_nums`` ([Z], null experts per MoE layer), ``zce_types``
    (``["zero"]``), ``use_zce_mask`` (route as if the null experts did not exist) and
    ``zce_logit_bias`` (the compute dial: added to the null experts' router logits at inference;
    > 0 sends more slots to null experts, < 0 fewer, 0 is the model as trained)."""

    model_type = "qwen3_moe_plus_plus"
    zce_nums: list[int] | None = None
    zce_types: list[str] | None = None
    use_zce_mask: bool = False
    zce_logit_bias: float = 0.0


__all__ = ["Qwen3MoePlusPlusConfig"]
