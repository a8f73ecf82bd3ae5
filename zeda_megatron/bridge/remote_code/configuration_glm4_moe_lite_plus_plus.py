"""GLM-4.7-Flash (glm4_moe_lite) with zero-computation (null) experts: configuration."""

from transformers.models.glm4_moe_lite.configuration_glm4_moe_lite import Glm4MoeLiteConfig

try:
    from huggingface_hub.dataclasses import strict
except ImportError:  # older huggingface_hub: plain subclass
    def strict(cls):
        return cls


@strict
class Glm4MoeLitePlusPlusConfig(Glm4MoeLiteConfig):
    """``Glm4MoeLiteConfig`` plus ``zce_nums`` ([Z], null experts per MoE layer), ``zce_types``
    (``["zero"]``), ``use_zce_mask`` (route as if the null experts did not exist) and
    ``zce_logit_bias`` (the compute dial: added to the null experts' router logits at inference;
    > 0 sends more slots to null experts, < 0 fewer, 0 is the model as trained)."""

    model_type = "glm4_moe_lite_plus_plus"
    zce_nums: list[int] | None = None
    zce_types: list[str] | None = None
    use_zce_mask: bool = False
    zce_logit_bias: float = 0.0


__all__ = ["Glm4MoeLitePlusPlusConfig"]
