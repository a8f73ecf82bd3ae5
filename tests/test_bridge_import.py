"""HF -> megatron-core import: logits parity with transformers, null-expert injection, EP/PP, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from zeda_megatron.bridge.hf_config import GLM, QWEN3, BridgeError
from bridge_fixtures import hf_logits, make_tiny_hf, mcore_logits

TOL = 1e-4
FAMILIES = [QWEN3, GLM]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_tiny_hf(fam, str(root / fam), seed=1) for fam in FAMILIES}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _parallel():
    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=1, pp=1, ep=1)
    yield


def _router(model, layer):
    return model.decoder.layers[layer].mlp.router


@pytest.mark.parametrize("family", FAMILIES)
def test_import_logits_match_transformers(family, hf_dirs, ids):
    from zeda_megatron.bridge.import_hf import import_hf

    ref = hf_logits(hf_dirs[family], ids)
    model, report = import_hf(hf_dirs[family])
    out = mcore_logits(model, ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    assert report["generated"] == []


@pytest.mark.parametrize(
    "family,overrides",
    [
        (QWEN3, dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=True)),
        (GLM, dict(rope_interleave=False, mlp_layer_types=["dense", "dense", "sparse", "sparse"])),
    ],
)
def test_import_config_variants(family, overrides, tmp_path, ids):
    """pre-softmax routing, decoder_sparse_step, tied embeddings; non-interleaved MLA rope, 2 dense layers."""
    from zeda_megatron.bridge.import_hf import import_hf

    d = make_tiny_hf(family, str(tmp_path / "m"), seed=2, tokenizer=False, **overrides)
    model, _ = import_hf(d)
    assert (mcore_logits(model, ids) - hf_logits(d, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_null_injection_masked_equals_original(family, hf_dirs, ids):
    from zeda_megatron.bridge.import_hf import import_hf

    d = hf_dirs[family]
    E, Z = 8, 4
    base, _ = import_hf(d)
    masked, report = import_hf(d, num_null_experts=Z, mask_null_experts=True, seed=11)
    ref = mcore_logits(base, ids)
    assert (mcore_logits(masked, ids) - ref).abs().max().item() <= TOL
    assert (mcore_logits(masked, ids) - hf_logits(d, ids)).abs().max().item() <= TOL
    # unmasked, the null experts take part in routing: logits change
    live, _ = import_hf(d, num_null_experts=Z, seed=11)
    assert (mcore_logits(live, ids) - ref).abs().max().item() > 1e-3

    moe = [i for i, layer in enumerate(masked.decoder.layers) if hasattr(layer.mlp, "router")]
    assert moe
    for i in moe:
        old, new = _router(base, i).weight.detach(), _router(masked, i).weight.detach()
        assert new.shape == (E + Z, old.shape[1])
        assert torch.equal(new[:E], old)  # bit-identical
        assert torch.equal(new, _router(live, i).weight.detach())  # same seed, same rows
    # statistics of the null rows: pool all layers' standardised draws, ~N(0, 1)
    zs = []
    for i in moe:
        w = _router(masked, i).weight.detach()
        mean, std = w[:E].mean(0), w[:E].std(0)
        zs.append((w[E:] - mean) / std)
    z = torch.cat(zs)
    assert abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.2
    if family == GLM:
        for i in moe:
            r = _router(masked, i)
            assert r.expert_bias.shape == (E,) and r.null_expert_bias.shape == (Z,)
            assert torch.equal(r.expert_bias, _router(base, i).expert_bias)
    # a different seed gives different rows
    other, _ = import_hf(d, num_null_experts=Z, seed=12)
    assert not torch.equal(_router(other, moe[0]).weight[E:], _router(masked, moe[0]).weight[E:])
    assert len(report["generated"]) == len(moe) * (2 if family == GLM else 1)


def test_null_row_statistics():
    """N(per-dimension mean, per-dimension std) of the existing rows; bias N(scalar mean, std)."""
    from zeda_megatron.bridge.import_hf import null_bias_values, null_router_rows

    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, 32, generator=g) * torch.linspace(0.1, 2.0, 32) + torch.linspace(-1, 1, 32)
    new = null_router_rows(old, 4000, seed=3)
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.1)
    assert torch.allclose(new.std(0), old.std(0), rtol=0.08)
    assert torch.equal(new, null_router_rows(old, 4000, seed=3))
    b = 0.3 + 0.05 * torch.randn(64, generator=g)
    nb = null_bias_values(b, 4000, seed=3)
    assert abs(nb.mean().item() - b.mean().item()) < 0.01 and abs(nb.std().item() / b.std().item() - 1) < 0.08


def test_error_null_count_mismatch(hf_dirs, tmp_path):
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.bridge.import_hf import import_hf

    model, _ = import_hf(hf_dirs[QWEN3], num_null_experts=4)
    save_hf_pretrained(model, str(tmp_path / "pp"))
    with pytest.raises(BridgeError, match=r"zce_nums=\[4\].*num_null_experts=2"):
        import_hf(str(tmp_path / "pp"), num_null_experts=2)


def test_null_ratio(hf_dirs):
    from zeda_megatron.bridge.import_hf import import_hf

    model, _ = import_hf(hf_dirs[QWEN3], null_ratio=0.5)
    assert _router(model, 0).weight.shape[0] == 12


# ------------------------------------------------------------------------------- errors
def test_error_wrong_family(tmp_path):
    from zeda_megatron.bridge.import_hf import import_hf

    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(BridgeError, match="model_type='llama'"):
        import_hf(str(d))


def test_error_missing_tensor(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from zeda_megatron.bridge.import_hf import import_hf

    d = tmp_path / "broken"
    shutil.copytree(hf_dirs[QWEN3], d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.2.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BridgeError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight"):
        import_hf(str(d))


def test_error_shape_mismatch(hf_dirs, tmp_path):
    from zeda_megatron.bridge.import_hf import import_hf

    d = tmp_path / "shape"
    shutil.copytree(hf_dirs[GLM], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BridgeError, match="shape mismatch"):
        import_hf(str(d))


def test_error_ep_not_dividing_experts(hf_dirs):
    from zeda_megatron.bridge.builders import check_layout
    from zeda_megatron.bridge.hf_config import model_info, read_config_json

    info = model_info(read_config_json(hf_dirs[GLM]))
    with pytest.raises(BridgeError, match=r"expert_model_parallel_size=3 .*n_routed_experts=8"):
        check_layout(info, tp=1, ep=3, pp=1)


# ------------------------------------------------------------------------------- EP / PP
@pytest.mark.parametrize("family,ep,pp", [(QWEN3, 2, 1), (GLM, 2, 1), (GLM, 1, 2)])
def test_import_ep_pp_logits(family, ep, pp, hf_dirs, ids, tmp_path):
    from dist_helpers import run_distributed

    from bridge_fixtures import dist_import_logits

    ref = hf_logits(hf_dirs[family], ids)
    # GLM under EP=2 also carries masked null experts (null rows live on every rank, experts split)
    # and is saved as a distributed checkpoint, which must load under EP=1 with the same weights.
    null = {"num_null_experts": 4, "mask_null_experts": True, "seed": 4} if (family, ep) == (GLM, 2) else {}
    ckpt = str(tmp_path / "ckpt") if null else None
    res = run_distributed(dist_import_logits, 2, hf_dirs[family], ep, pp, ids, null, 1, ckpt)
    if ckpt:
        from zeda_megatron.bridge.checkpoint import load_checkpoint
        from zeda_megatron.bridge.import_hf import import_hf

        loaded = load_checkpoint(ckpt)
        direct, _ = import_hf(hf_dirs[family], **null)
        s1, s2 = loaded.state_dict(), direct.state_dict()
        assert s1.keys() == s2.keys()
        assert all(torch.equal(s1[k], s2[k]) for k in s1 if torch.is_tensor(s1[k]))
    last = res[-1]["logits"]
    assert (last - ref).abs().max().item() <= TOL
    if ep == 2:
        assert (res[0]["logits"] - ref).abs().max().item() <= TOL
        for rank, r in enumerate(res):  # each rank read only its own experts
            experts = {int(k.split(".mlp.experts.")[1].split(".")[0]) for k in r["read"] if ".mlp.experts." in k}
            assert experts == set(range(rank * 4, rank * 4 + 4)), (rank, experts)
    if pp == 2:
        layers = [{int(k.split(".")[2]) for k in r["read"] if k.startswith("model.layers.")} for r in res]
        assert layers == [{0, 1}, {2, 3}]
        assert "lm_head.weight" not in res[0]["read"] and "model.embed_tokens.weight" not in res[1]["read"]


def test_mtp_layer_skipped_with_note(hf_dirs, tmp_path, caplog, ids):
    """GLM-4.7-Flash checkpoints carry a multi-token-prediction layer after the last decoder layer:
    it is skipped with a logged note, and the rest loads as usual."""
    from safetensors.torch import load_file, save_file

    from zeda_megatron.bridge.import_hf import import_hf

    d = tmp_path / "mtp"
    shutil.copytree(hf_dirs[GLM], d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)
    sd["model.layers.4.self_attn.q_a_proj.weight"] = torch.zeros(48, 64)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        model, report = import_hf(str(d))
    assert report["skipped_layers"] == ["4"]
    assert "multi-token-prediction" in caplog.text
    assert (mcore_logits(model, ids) - hf_logits(hf_dirs[GLM], ids)).abs().max().item() <= TOL


def test_fused_expert_layout(hf_dirs, tmp_path, ids):
    """Checkpoints with transformers' fused 3D expert tensors (experts.gate_up_proj [E, 2F, H],
    experts.down_proj [E, H, F]) import like the per-expert layout, one expert slice at a time."""
    from safetensors.torch import load_file, save_file

    from zeda_megatron.bridge.import_hf import import_hf

    d = tmp_path / "fused"
    shutil.copytree(hf_dirs[QWEN3], d)
    sd = load_file(str(d / "model.safetensors"))
    for layer in range(4):
        p = f"model.layers.{layer}.mlp.experts."
        if p + "0.gate_proj.weight" not in sd:
            continue
        gu = [torch.cat([sd.pop(f"{p}{e}.gate_proj.weight"), sd.pop(f"{p}{e}.up_proj.weight")]) for e in range(8)]
        sd[p + "gate_up_proj"] = torch.stack(gu)
        sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(8)])
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    model, report = import_hf(str(d))
    assert any(k.endswith("gate_up_proj[3]") for k in report["read"])
    assert (mcore_logits(model, ids) - hf_logits(hf_dirs[QWEN3], ids)).abs().max().item() <= TOL


def test_import_tp2_logits(hf_dirs, ids):
    from dist_helpers import run_distributed

    from bridge_fixtures import dist_import_logits

    ref = hf_logits(hf_dirs[QWEN3], ids)
    res = run_distributed(dist_import_logits, 2, hf_dirs[QWEN3], 1, 1, ids, {}, 2)
    for r in res:
        assert (r["logits"] - ref).abs().max().item() <= TOL
