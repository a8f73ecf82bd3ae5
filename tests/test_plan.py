"""Memory plan (python -m zeda_megatron.plan): parameter counts against transformers, the plan's bytes
against what the trainer allocates, the reference presets fit 80 GB, a layout that does not fit is
refused before any weight is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from zeda_megatron import plan as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
RELEASED = ("qwen3_30b_a3b", "glm47_flash")


def compose(*overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hcompose("config", overrides=["run_dir=/tmp/zeda-plan-test", *overrides])


def plan_of(*overrides, world=None, gpu_gb=80, on_gpu=True):
    """The plan (fixes included) of the GPU run ``overrides`` describe, as ``python -m zeda_megatron.plan``
    computes it."""
    from zeda_megatron.spec import resolve

    return P.plan_with_fixes(resolve(compose(*overrides), world, inputs=False, on_gpu=on_gpu, gpu_gb=gpu_gb))


def spec_of(*overrides, world=None):
    from zeda_megatron.spec import resolve

    return resolve(compose(*overrides), world, inputs=False, on_gpu=True)


def hf_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.model.hf_config, resolve=True)


def transformers_counts(hf: dict) -> tuple[int, int]:
    """(parameters, router bias buffer elements) of transformers' model for this config, on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hf)
    model_type = kw.pop("model_type")
    kw.pop("architectures", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    params = sum(p.numel() for p in model.parameters())
    bias = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return params, bias, model.config.num_hidden_layers


@pytest.mark.parametrize("model", RELEASED)
def test_param_count_equals_transformers_on_meta(model):
    """The original model's count equals transformers' exactly; the student adds exactly the null
    router rows (Z x H per MoE layer) and, for GLM, Z expert-bias entries per MoE layer. GLM-4.7-Flash's
    MTP layer is excluded on both sides (transformers builds none; the bridge imports none)."""
    cfg = compose(f"model={model}")
    hf = hf_dict(cfg)
    counts = P.param_counts(hf, spec_of(f"model={model}").model.null.num)
    hf_params, hf_bias, hf_layers = transformers_counts(hf)
    assert hf_layers == hf["num_hidden_layers"]  # no MTP layer in transformers' model
    assert counts["original"] == hf_params
    s = P.shapes_of(hf)
    z = s.experts // 2
    n_moe = sum(s.moe_layers)
    assert counts["student"] - counts["original"] == n_moe * z * s.hidden == counts["null_router_rows"]
    assert counts["original_router_bias"] == hf_bias
    if model == "glm47_flash":
        assert hf_bias == n_moe * s.experts and counts["student_router_bias"] == n_moe * (s.experts + z)
    else:
        assert hf_bias == 0 and counts["student_router_bias"] == 0
    assert counts["original"] > 29e9  # the ~30B models


@pytest.mark.parametrize("model", RELEASED)
@pytest.mark.parametrize("stage", ("sft", "opd"))
def test_reference_presets_fit_80gb(model, stage):
    cfg = compose(f"model={model}", "parallel=reference_8gpu", f"stage={stage}")
    assert cfg.trainer.micro_batch_size * cfg.trainer.seq_length == (65536 if stage == "sft" else 2 * 36864)
    plan = plan_of(f"model={model}", "parallel=reference_8gpu", f"stage={stage}")
    assert plan["layout"] == {"world": 8, "tp": 4, "pp": 1, "ep": 8, "etp": 1, "dp": 2, "expert_dp": 1,
                              "sequence_parallel": True}
    assert plan["fits"] is True and plan["gpu_bytes"] < 80e9, P.format_table(plan)
    parts = plan["per_gpu_bytes"]
    assert parts["optimizer_states"] == 0 and plan["host_optimizer_bytes"] > 0  # offloaded
    assert (parts["rollout_kv_cache"] > 0) == (stage == "opd")
    # without the preset's memory settings the same layout does not fit (the issue's ~77 GB of states)
    bad = plan_of(f"model={model}", "parallel=reference_8gpu", f"stage={stage}",
                  "optim.optimizer_cpu_offload=false", "trainer.recompute=false")
    assert bad["fits"] is False
    assert bad["fixes"][:2] == ["trainer.recompute=full",
                               "optim.optimizer_cpu_offload=true optim.optimizer_offload_fraction=1.0"]
    # full-vocabulary logits of the reference's tokens per micro-batch do not fit either: the fused KL does
    unfused = plan_of(f"model={model}", "parallel=reference_8gpu", f"stage={stage}", "stage.fused_loss=false")
    assert unfused["fits"] is False and unfused["fixes"] == ["stage.fused_loss=true"]
    # (the fused row counts the fp32 gradients of the gathered hidden states and the output weight too)
    assert unfused["per_gpu_bytes"]["loss_logits"] > 25 * parts["loss_logits"]
    # while sampling, grads and optimizer states are offloaded: a whole step's share of sequences per DP rank
    # (32 / DP 2) decodes together, and more would fit
    if stage == "opd":
        assert plan["settings"]["offload_while_sampling"] is True
        assert plan["settings"]["rollout_batch_max"] > plan["settings"]["rollout_batch"] == 16


def test_per_gpu_split_follows_the_layout():
    """Experts split by EP x ETP, dense weights by TP (norms/router/MLA down projections replicated),
    layers by PP; the distributed optimizer shards dense states over DP and experts over expert-DP."""
    cfg = compose("model=glm47_flash")
    hf = hf_dict(cfg)
    s = P.shapes_of(hf)
    one = P.layer_params(s, True, 32)
    four = P.layer_params(s, True, 32, tp=4, ep=8, etp=1)
    assert four["expert"] * 8 == one["expert"]
    replicated = 2 * s.hidden + s.hidden * s.q_lora + s.q_lora + s.hidden * (s.kv_lora + s.qk_rope) + s.kv_lora \
        + (s.experts + 32) * s.hidden
    assert (one["dense"] - replicated) == 4 * (four["dense"] - replicated)
    layout = ("model=glm47_flash", "parallel.ep=8", "parallel.tp=1", "trainer.global_batch_size=16")  # DP 8
    a = plan_of(*layout, world=8)
    b = plan_of(*layout, "optim.use_distributed_optimizer=false", world=8)
    dense, expert = a["per_gpu_params"]["student_dense"], a["per_gpu_params"]["student_expert"]
    assert a["layout"]["dp"] == 8 and a["layout"]["expert_dp"] == 1
    assert a["per_gpu_bytes"]["optimizer_states"] == int((dense / 8 + expert) * 12)
    assert b["per_gpu_bytes"]["optimizer_states"] == (dense + expert) * 12


def test_plan_cli_prints_table_and_json_line():
    res = subprocess.run(
        [sys.executable, "-m", "zeda_megatron.plan", "model=qwen3_30b_a3b", "parallel=reference_8gpu", "stage=sft"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out) >= {"total_params", "student_params", "per_gpu_bytes", "gpu_bytes", "fits"}
    assert out["fits"] is True and out["gpu_capacity_bytes"] == 80 * 10**9
    assert set(out["per_gpu_bytes"]) == {"student_params", "student_grads", "optimizer_states", "teacher_params",
                                         "activations", "loss_logits", "rollout_kv_cache", "reserve"}
    assert "| student parameters |" in res.stdout and "headroom" in res.stdout and "fits: yes" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "zeda_megatron.plan", "model=glm47_flash", "parallel=single", "stage=opd", "gpu_gb=40"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fits"] is False and "fits: NO" in res.stdout and "more GPUs" in res.stdout


# ---- the plan against the trainer's tensors ----------------------------------------------------------
def _measure(rank, world, hf_dir, overrides, ep):
    """Build teacher + student + DDP + optimizer with the trainer's own build functions on this rank,
    take one optimizer step (Adam's moments exist after it) and measure the tensors."""
    from spec_fixtures import run_spec

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training import build as B

    init_parallel(tp=1, pp=1, ep=ep, seed=1)
    spec = run_spec(hf_dir, *overrides, "seed=1", "trainer.max_steps=2")
    teacher, student, config, _ = B.build_models(spec, hf_dir)
    ddp, optimizer, _ = B.build_optimizer(student, config, spec)
    for p in student.parameters():
        p.main_grad.zero_()
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    grads = [b.grad_data for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers)]
    states = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            states += [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "student_params": nbytes(student.parameters()), "teacher_params": nbytes(teacher.parameters()),
        "student_grads": nbytes(grads), "optimizer_states": nbytes(states),
        "student_numel": sum(p.numel() for p in student.parameters()),
    }


@pytest.mark.parametrize("model,ep", [("tiny_glm", 1), ("tiny_qwen3", 2)])
def test_tiny_plan_bytes_equal_what_the_trainer_allocates(model, ep, tmp_path):
    """Parameters, DDP grad buffer and Adam states the plan predicts per rank equal the trainer's tensors
    (CPU: fp32 params and grads, plain Adam), alone and with the experts split over EP=2 (2 ranks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_helpers import run_distributed
    from zeda_megatron.distributed import destroy_parallel

    cfg = compose(f"model={model}", "stage=sft", f"parallel.ep={ep}")
    hf = hf_dict(cfg)
    kw = dict(hf)
    model_type = kw.pop("model_type")
    kw.pop("architectures", None)
    hf_dir = str(tmp_path / "hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).save_pretrained(hf_dir)
    overrides = [f"model={model}", "stage=sft", f"parallel.ep={ep}"]
    if ep == 1:
        try:
            measured = [_measure(0, 1, hf_dir, overrides, 1)]
        finally:
            destroy_parallel()
    else:
        measured = run_distributed(_measure, ep, hf_dir, overrides, ep)
        assert measured[0] == measured[1]
    m = measured[0]
    plan = plan_of(*overrides, world=ep, gpu_gb=None, on_gpu=False)
    parts = plan["per_gpu_bytes"]
    assert plan["per_gpu_params"]["student"] == m["student_numel"]
    if ep == 1:
        assert m["student_numel"] == plan["student_params"]
    else:  # half of the routed experts on each rank
        assert plan["per_gpu_params"]["student_expert"] * 2 + plan["per_gpu_params"]["student_dense"] \
            == plan["student_params"]
    for key in ("student_params", "teacher_params", "student_grads", "optimizer_states"):
        assert parts[key] == m[key], (key, parts[key], m[key])
    assert parts["student_params"] - parts["teacher_params"] == plan["null_router_rows"] * 4


# ---- refusal before any weight is read ---------------------------------------------------------------
def test_layout_that_does_not_fit_is_refused_before_weights(tmp_path):
    """The trainer's validation runs the plan: Qwen3-30B-A3B on one GPU of 80 GB is refused with the
    settings that would help, from a folder with config.json only (no weights to read)."""
    from omegaconf import OmegaConf

    from zeda_megatron.training.validate import ConfigError, validate_config

    cfg = compose("model=qwen3_30b_a3b", "stage=sft", "parallel.gpu_memory_gb=80")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(OmegaConf.to_container(cfg.model.hf_config, resolve=True)))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    cfg = compose("model=qwen3_30b_a3b", "stage=sft", "parallel.gpu_memory_gb=80", f"model.hf_dir={hf_dir}",
                  f"data.path={data}")
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, 1)
    msg = str(e.value)
    assert "does not fit" in msg and "parallel.gpu_memory_gb" in msg
    assert "trainer.recompute=full" in msg and "more GPUs" in msg
    # the same layout with the check off passes validation
    validate_config(compose("model=qwen3_30b_a3b", "stage=sft", "parallel.gpu_memory_gb=null",
                            f"model.hf_dir={hf_dir}", f"data.path={data}"), 1)


def test_offload_settings_checked():
    from zeda_megatron.training.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"optim.optimizer_offload_fraction=1.5"):
        validate_config(compose("model=tiny_qwen3", "optim.optimizer_offload_fraction=1.5"), 1)
    from zeda_megatron.spec import resolve

    with pytest.raises(ConfigError, match="needs the distributed optimizer"):
        resolve(compose("model=tiny_qwen3", "optim.optimizer_cpu_offload=true", "optim.use_distributed_optimizer=false",
                        "parallel.gpu_memory_gb=null"), 1, on_gpu=True)
