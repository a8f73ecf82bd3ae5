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
    (``["zero"]``) and ``use_zce_mask`` (route as if the null experts did not exist)."""

    model_type = "qwen3_moe_plus_plus"
    zce_nums: list[int] | None = None
    zce_types: list[str] | None = None
    use_zce_mask: bool = False


__all__ = ["Qwen3MoePlusPlusConfig"]
