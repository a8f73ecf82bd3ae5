"""model.mcore: TransformerConfig fields from the run config to the student's and the teacher's
config; unknown, architecture, trainer-managed and null-expert-unsupported keys refused (naming the
key) before anything is built; CUDA-only kernels forced off on CPU, kept by the GPU presets."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from zeda_megatron.bridge import hf_config as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def compose(*overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hcompose("config", overrides=["run_dir=/tmp/zeda-mcore-test", *overrides])


def info_of(model: str):
    from omegaconf import OmegaConf

    return H.model_info(OmegaConf.to_container(compose(f"model={model}").model.hf_config, resolve=True))


@pytest.mark.parametrize(
    "settings,words",
    [
        ({"moe_groupd_gemm": True}, ["model.mcore.moe_groupd_gemm", "did you mean moe_grouped_gemm"]),
        ({"not_a_field": 1}, ["model.mcore.not_a_field", "not a field"]),
        ({"hidden_size": 128}, ["model.mcore.hidden_size", "HF config"]),
        ({"tensor_model_parallel_size": 2}, ["model.mcore.tensor_model_parallel_size", "parallel.tp"]),
        ({"moe_aux_loss_coeff": 0.5}, ["model.mcore.moe_aux_loss_coeff", "model.group_loss_coeff"]),
        ({"recompute_granularity": "full"}, ["model.mcore.recompute_granularity", "trainer.recompute"]),
        ({"fp8": "hybrid"}, ["model.mcore.fp8", "null experts", "FP8"]),
        ({"fp8_recipe": "delayed"}, ["model.mcore.fp8_recipe", "null experts"]),
        ({"enable_cuda_graph": True}, ["model.mcore.enable_cuda_graph", "CUDA graphs"]),
        ({"cuda_graph_impl": "local"}, ["model.mcore.cuda_graph_impl", "CUDA graphs"]),
        ({"moe_expert_capacity_factor": 1.0}, ["model.mcore.moe_expert_capacity_factor", "dropless"]),
        ({"moe_pad_expert_input_to_capacity": True}, ["model.mcore.moe_pad_expert_input_to_capacity"]),
        ({"moe_token_dispatcher_type": "flex"}, ["model.mcore.moe_token_dispatcher_type", "flex"]),
        ({"moe_enable_deepep": True}, ["model.mcore.moe_enable_deepep"]),
        ({"mtp_num_layers": 1}, ["model.mcore.mtp_num_layers", "multi-token prediction"]),
    ],
)
def test_refused_settings_name_the_key(settings, words):
    with pytest.raises(H.MCoreSettingError) as e:
        H.check_mcore_settings(settings, family=H.GLM)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_allowed_settings_and_mla_fields_by_family():
    ok = {"moe_grouped_gemm": True, "moe_permute_fusion": True, "moe_z_loss_coeff": 1e-3, "fp8": None,
          "moe_token_dispatcher_type": "allgather", "cuda_graph_impl": "none", "moe_expert_capacity_factor": None}
    assert H.check_mcore_settings(ok, family=H.QWEN3) == ok
    assert H.check_mcore_settings({"cache_mla_latents": False}, family=H.GLM)  # an MLATransformerConfig field
    with pytest.raises(H.MCoreSettingError, match="cache_mla_latents"):
        H.check_mcore_settings({"cache_mla_latents": False}, family=H.QWEN3)


def test_gpu_presets_turn_on_grouped_gemm_and_fusions():
    """The released models' presets ask for grouped GEMM + fused permute; on a GPU they reach the
    TransformerConfig, on CPU they are forced off (the CPU platform cannot run them)."""
    from omegaconf import OmegaConf

    import zeda_megatron.platform as platform

    for model in ("qwen3_30b_a3b", "glm47_flash"):
        mcore = OmegaConf.to_container(compose(f"model={model}").model.mcore)
        assert mcore["moe_grouped_gemm"] is True and mcore["moe_permute_fusion"] is True
        info = info_of(model)
        cpu = H.transformer_config(info, mcore=mcore)
        assert cpu.moe_grouped_gemm is False and cpu.moe_permute_fusion is False
        gpu_only = {k: v for k, v in mcore.items() if k != "moe_permute_fusion"}  # needs TE at config time
        with mock.patch.object(platform, "cpu_config_overrides", lambda: {}):
            gpu = H.transformer_config(info, mcore=gpu_only, tensor_model_parallel_size=4,
                                       expert_model_parallel_size=8, sequence_parallel=True)
        assert gpu.moe_grouped_gemm is True and gpu.gradient_accumulation_fusion is True
    # tiny (CPU) presets set nothing: sequential experts
    assert OmegaConf.to_container(compose("model=tiny_glm").model.mcore) == {}


def test_mcore_reaches_student_and_teacher_config(tmp_path):
    """Through the trainer's own build (training.build.build_models): the teacher (stock layer) and the
    student (null experts) both get the model.mcore fields; CUDA-only kernels are forced off on CPU."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from spec_fixtures import run_spec

    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.training.build import build_models, cpu_offload_settings

    hf = OmegaConf.to_container(compose("model=tiny_qwen3").model.hf_config, resolve=True)
    model_type = hf.pop("model_type")
    hf.pop("architectures", None)
    hf_dir = str(tmp_path / "hf")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf)).save_pretrained(hf_dir)
    settings = {"moe_z_loss_coeff": 2e-3, "moe_router_dtype": "fp64", "moe_grouped_gemm": True}
    init_parallel(tp=1, pp=1, ep=1, seed=3)
    try:
        spec = run_spec(hf_dir, "model.null_experts.ratio=null", "model.null_experts.num=4",
                        "model.null_experts.weight=2.0", "model.group_loss_coeff=0.1", "seed=1",
                        *(f"+model.mcore.{k}={v}" for k, v in settings.items()))
        teacher, student, scfg, _ = build_models(spec, hf_dir)
    finally:
        destroy_parallel()
    for cfg, model in ((teacher.config, teacher), (scfg, student)):
        assert cfg.moe_z_loss_coeff == 2e-3 and cfg.moe_router_dtype == "fp64"
        assert cfg.moe_grouped_gemm is False  # forced off on CPU
        routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
        assert routers and all(r.config.moe_router_dtype == "fp64" for r in routers)
    assert scfg.moe_router_load_balancing_type == "grouped_aux_loss"  # the trainer's own settings still win
    with pytest.raises(H.MCoreSettingError, match="model.mcore.fp8"):
        H.transformer_config(H.model_info({**hf, "model_type": model_type}), mcore={"fp8": "hybrid"})
    assert cpu_offload_settings(spec.optim) == {}
    offload = spec.with_(**{"optim.cpu_offload": True, "optim.offload_fraction": 0.5}).optim
    assert cpu_offload_settings(offload) == dict(
        optimizer_cpu_offload=True, use_precision_aware_optimizer=True, optimizer_offload_fraction=0.5)


def test_trainer_validation_refuses_bad_mcore_before_building(tmp_path):
    from zeda_megatron.training.validate import ConfigError, validate_config

    validate_config(compose("model=tiny_qwen3", "+model.mcore.moe_z_loss_coeff=0.001"), 1)
    for override, key in (("+model.mcore.moe_grouped_gem=true", "model.mcore.moe_grouped_gem"),
                          ("+model.mcore.fp8=hybrid", "model.mcore.fp8"),
                          ("+model.mcore.cuda_graph_impl=local", "model.mcore.cuda_graph_impl"),
                          ("+model.mcore.sequence_parallel=true", "parallel.sequence_parallel")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(compose("model=tiny_qwen3", override), 1)
    # megatron-core's own consistency checks run at validation time too
    with pytest.raises(ConfigError, match="model.mcore: megatron-core rejects.*middle"):
        validate_config(compose("model=tiny_qwen3", "+model.mcore.num_layers_in_first_pipeline_stage=3"), 1)
