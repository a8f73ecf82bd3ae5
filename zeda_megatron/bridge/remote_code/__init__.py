"""Modeling code shipped inside exported HF directories that have null ("zero-computation") experts.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads these files through the
config's ``auto_map``; they need only torch and transformers. Config fields follow the reference
ZEDA release: ``zce_nums`` (Z per MoE layer, one value), ``zce_types`` (``["zero"]``) and
``use_zce_mask`` (mask the null experts' logits: the original model's routing).
"""

import os

_COMMON = ("zce_common.py",)
FILES = {
    "qwen3_moe": ("configuration_qwen3_moe_plus_plus.py", "modeling_qwen3_moe_plus_plus.py") + _COMMON,
    "glm4_moe_lite": ("configuration_glm4_moe_lite_plus_plus.py", "modeling_glm4_moe_lite_plus_plus.py") + _COMMON,
}
# The routing the shipped models run is zeda_megatron/routing.py itself (pure torch), as zeda_routing.py.
ROUTING_FILE = ("zeda_routing.py", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "routing.py"))
