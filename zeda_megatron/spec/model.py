"""The model part of a run's spec: the HF config in force, the null experts, the ``model.mcore`` settings
(checked by building megatron-core's TransformerConfig once, no model)."""

from __future__ import annotations

import json
import os

from zeda_megatron.layout import num_experts_of
from zeda_megatron.routing import num_null_from_ratio, target_null_share
from zeda_megatron.spec.lookup import ConfigError, container, get, integer, is_missing, number
from zeda_megatron.spec.types import LayoutSpec, ModelSpec, NullSpec, TrainerSpec

FAMILIES = ("qwen3_moe", "glm4_moe_lite", "qwen3_moe_plus_plus", "glm4_moe_lite_plus_plus")
MIN_BYTE_TOKENIZER_VOCAB = 260  # 256 bytes + the built-in tokenizer's specials
# fields of model.hf_config that must agree with hf_dir/config.json when both are given
STRUCTURAL_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
)


def resolve_model(cfg, stage: str, inputs: bool, notes: list) -> ModelSpec:
    hf, source, hf_dir = _hf_config(cfg, stage, inputs)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"model.hf_config.model_type={model_type!r} is not supported; use one of {list(FAMILIES[:2])}")
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_experts_per_tok"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise ConfigError(f"model.hf_config.{key}={hf.get(key)!r} must be a positive integer")
    n_exp = num_experts_of(hf)
    if not n_exp:
        key = "n_routed_experts" if model_type.startswith("glm") else "num_experts"
        raise ConfigError(f"model.hf_config.{key} is missing: the model has no routed experts")
    topk = int(hf["num_experts_per_tok"])
    if source == "random_init" and int(hf["vocab_size"]) < MIN_BYTE_TOKENIZER_VOCAB:
        raise ConfigError(
            f"model.hf_config.vocab_size={hf['vocab_size']} is too small for the built-in byte tokenizer "
            f"(needs >= {MIN_BYTE_TOKENIZER_VOCAB}); raise it or set model.hf_dir"
        )
    init_ckpt = get(cfg, "model.init_checkpoint")
    if inputs and init_ckpt and not os.path.exists(str(init_ckpt)):
        raise ConfigError(f"model.init_checkpoint={init_ckpt!r} does not exist; give the stage 1 checkpoint folder")
    if stage == "opd" and not init_ckpt:
        notes.append("stage=opd without model.init_checkpoint: the student starts from the original model "
                     "(OPD only, no stage 1)")
    null = _null(cfg, hf, n_exp, topk, notes)
    number(cfg, "model.group_loss_coeff", lo=0)
    from zeda_megatron.bridge.hf_config import BridgeError, check_mcore_settings, model_info

    try:
        family = model_info(hf).family
        mcore = check_mcore_settings(get(cfg, "model.mcore"), family=family)
    except BridgeError as e:
        raise ConfigError(str(e)) from e
    return ModelSpec(
        name=str(get(cfg, "model.name", "")), hf_dir=hf_dir, hf_config=hf, source=source, family=family,
        num_experts=n_exp, topk=topk, null=null, group_loss_coeff=float(get(cfg, "model.group_loss_coeff")),
        init_checkpoint=str(init_ckpt) if init_ckpt else None, mcore=mcore or {},
        chat_template=bool(get(cfg, "model.chat_template", False)),
    )


def _hf_config(cfg, stage: str, inputs: bool) -> tuple[dict, str, str | None]:
    """(HF config in force, source, hf_dir): hf_dir/config.json when model.hf_dir is set (checked against
    the structural keys of model.hf_config), else model.hf_config."""
    if not inputs and is_missing(cfg, "model.hf_dir"):
        hf_dir = None  # the released presets' ??? : their shapes are in model.hf_config
    else:
        hf_dir = get(cfg, "model.hf_dir")
    hf_config = container(get(cfg, "model.hf_config"))
    if hf_dir:
        path = os.path.join(str(hf_dir), "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"model.hf_dir={hf_dir!r} has no config.json; point it at a Hugging Face checkpoint folder "
                "(the original model: the teacher and the student's start)"
            )
        with open(path) as f:
            disk = json.load(f)
        for key in STRUCTURAL_KEYS:
            if key in hf_config and key in disk and hf_config[key] != disk[key]:
                raise ConfigError(
                    f"model.hf_config.{key}={hf_config[key]!r} but {path} says {disk[key]!r}: wrong model for "
                    f"model={get(cfg, 'model.name')}? Pick the matching model config, or set model.hf_config=null"
                )
        return disk, "hf_dir", str(hf_dir)
    if not hf_config:
        what = "stage=opd needs a teacher" if stage == "opd" else "the trainer needs a model"
        raise ConfigError(
            f"model.hf_dir and model.hf_config are both null: {what}. Set model.hf_dir=<HF checkpoint of the "
            "original model> (or model.hf_config for a random-init test model)"
        )
    shapes_only = not inputs and is_missing(cfg, "model.hf_dir")
    return hf_config, "shapes" if shapes_only else "random_init", None


def _null(cfg, hf: dict, n_exp: int, topk: int, notes: list) -> NullSpec:
    num = get(cfg, "model.null_experts.num")
    ratio = get(cfg, "model.null_experts.ratio")
    if (num is None) == (ratio is None):
        raise ConfigError(
            "model.null_experts: set exactly one of num (Z) or ratio (Z/E); got "
            f"num={num!r}, ratio={ratio!r} (e.g. model.null_experts.num=null model.null_experts.ratio=0.5)"
        )
    if num is not None:
        z = integer(cfg, "model.null_experts.num", minimum=0)
    else:
        number(cfg, "model.null_experts.ratio", lo=0)
        try:
            z = num_null_from_ratio(n_exp, float(ratio))
        except ValueError as e:
            raise ConfigError(
                f"model.null_experts.ratio={ratio}: {e}; pick a ratio with ratio*E whole, or set model.null_experts.num"
            ) from e
    weight = number(cfg, "model.null_experts.weight", lo=0, lo_open=True)
    mask = bool(get(cfg, "model.null_experts.mask", False))
    if z == 0:
        notes.append("model.null_experts gives Z=0: the student has no null experts")
    if topk > n_exp + z:
        raise ConfigError(f"num_experts_per_tok={topk} exceeds E+Z={n_exp}+{z}; add null experts")
    if mask and topk > n_exp:
        raise ConfigError(f"model.null_experts.mask=true needs num_experts_per_tok={topk} <= E={n_exp}")
    n_group = int(hf.get("n_group") or 1)
    if n_group > 1 and (n_exp + z) % n_group:
        raise ConfigError(
            f"model.null_experts: E+Z={n_exp}+{z} is not divisible by the router's n_group={n_group}; "
            "choose Z so that n_group divides E+Z"
        )
    share = target_null_share(n_exp, z, weight) if z else 0.0
    return NullSpec(num=z, weight=weight, mask=mask, target_share=share)


def check_mcore(model: ModelSpec, layout: LayoutSpec, trainer: TrainerSpec) -> None:
    """With model.mcore settings, build (only) the TransformerConfig with them and the layout, so that
    megatron-core's own consistency checks fail now, not after the weights are loaded."""
    if not model.mcore:
        return
    from zeda_megatron.bridge.hf_config import model_info, transformer_config

    dtype = trainer.dtype
    try:
        transformer_config(
            model_info(model.hf_config), params_dtype=dtype, mcore=model.mcore, tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp, sequence_parallel=layout.sp,
            pipeline_dtype=dtype if layout.pp > 1 else None,
        )
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"model.mcore: megatron-core rejects these settings: {e}") from e
