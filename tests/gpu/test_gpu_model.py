"""GPU smoke (marker ``gpu``; run by tools/gpu_smoke.sh): the Transformer Engine spec builds both families
with null experts and matches transformers; TE grouped GEMM + fused permute equal the sequential experts
(outputs and every expert and router gradient); the memory plan reads the real GPU size."""

from __future__ import annotations

import os

import pytest
import torch

from bridge_fixtures import hf_logits, make_tiny_hf
from smoke_runs import compare_grads, expert_and_router_grads

pytestmark = pytest.mark.gpu

FAMILIES = ("qwen3_moe", "glm4_moe_lite")
FUSED = {"moe_grouped_gemm": True, "moe_permute_fusion": True, "gradient_accumulation_fusion": False}


def have_te() -> bool:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


needs_te = pytest.mark.skipif(torch.cuda.is_available() and not have_te(), reason="Transformer Engine is not installed: the local spec runs "
                              "(no TE modules, no grouped GEMM to compare)")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny_hf(f, str(root / f), seed=2) for f in FAMILIES}


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    init_parallel(tp=1, pp=1, ep=1, seed=5)
    yield
    destroy_parallel()


def _ids():
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    ids = ids.cuda()
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None).float()


@needs_te
@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", FAMILIES)
def test_te_spec_builds_and_matches_transformers(family, hf_dirs, figures):
    from zeda_megatron.bridge.import_hf import import_hf
    from zeda_megatron.mcore.moe_layer import NullExpertMoELayer

    model, _ = import_hf(hf_dirs[family], null_ratio=0.5, mask_null_experts=True, params_dtype=torch.bfloat16)
    names = {type(m).__name__ for m in model.modules()}
    assert any(n.startswith("TE") for n in names), names  # Transformer Engine modules, not the local spec
    assert any(isinstance(m, NullExpertMoELayer) for m in model.modules())
    assert next(model.parameters()).is_cuda
    model.eval()
    with torch.no_grad():
        out = _logits(model, _ids()).cpu()
    ref = hf_logits(hf_dirs[family], _ids())  # fp32 on CPU; null experts masked = the original model
    err = (out - ref).abs().max().item()
    figures.update(max_abs_err=err, max_abs_logit=ref.abs().max().item())
    # bf16 weights and activations against fp32: a few bf16 ulps (2^-8) of the largest logit
    assert err <= 0.05 * ref.abs().max().item(), err


@needs_te
@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_gemm_equals_sequential_experts(family, hf_dirs, figures):
    """TE grouped GEMM + fused permute vs the sequential experts on the same weights, with null experts
    thinning the rows (Z = E/2): the same logits, and every expert's and router's gradient equal. Both
    builds round the same weights and inputs to bf16; only the order of fp32 accumulation differs."""
    from zeda_megatron.bridge.import_hf import import_hf

    outs, grads = [], []
    for mcore in ({}, FUSED):
        model, _ = import_hf(hf_dirs[family], null_ratio=0.5, seed=3, params_dtype=torch.bfloat16, mcore=mcore)
        kinds = {type(m).__name__ for m in model.modules()}
        assert ("TEGroupedMLP" in kinds) == bool(mcore), kinds
        model.train()
        out = _logits(model, _ids())
        out.float().pow(2).mean().backward()
        outs.append(out.detach().cpu())
        grads.append(expert_and_router_grads(model))
        del model
    scale = outs[0].abs().max().item()
    out_err = (outs[0] - outs[1]).abs().max().item()
    fails = compare_grads(grads[0], grads[1])
    n_expert = sum(".experts." in k for k in grads[0])
    figures.update(max_abs_logit_diff=out_err, max_abs_logit=scale, expert_tensors=n_expert,
                   router_tensors=len(grads[0]) - n_expert, gradient_mismatches=fails)
    assert n_expert > 0 and len(grads[0]) > n_expert, sorted(grads[0])[:10]
    assert out_err <= 0.02 * scale, out_err
    assert not fails, fails


@pytest.mark.timeout(30)
def test_memory_plan_reads_this_gpu(figures):
    from zeda_megatron import plan as P
    from zeda_megatron.spec import compose, resolve

    spec = resolve(compose(["model=tiny_glm"], run_dir="/tmp/x"), 1, inputs=False)
    plan = P.check_fits(spec)  # parallel.gpu_memory_gb=auto: this GPU's size
    figures.update(gpu_capacity_bytes=plan and plan["gpu_capacity_bytes"])
    assert plan is not None and plan["fits"] is True
    assert plan["gpu_capacity_bytes"] == torch.cuda.get_device_properties(0).total_memory
