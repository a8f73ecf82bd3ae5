"""megatron-core -> HF export: stock and "++" (null-expert) directories, remote code, round trips,
the convert/export commands and multi-rank export."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from zeda_megatron.bridge.hf_config import GLM, QWEN3
from bridge_fixtures import hf_logits, make_tiny_hf, mcore_logits, read_hf_tensors

TOL = 1e-4
FAMILIES = [QWEN3, GLM]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_tiny_hf(fam, str(root / fam), seed=3) for fam in FAMILIES}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def _parallel():
    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=1, pp=1, ep=1)
    yield


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("Z", [0, 4])
def test_export_loads_in_transformers(family, Z, hf_dirs, ids, tmp_path):
    from transformers import AutoTokenizer

    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.bridge.import_hf import import_hf

    model, _ = import_hf(hf_dirs[family], num_null_experts=Z, seed=5)
    out = str(tmp_path / "out")
    save_hf_pretrained(model, out, assets_dir=hf_dirs[family])
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    py = sorted(f for f in os.listdir(out) if f.endswith(".py"))
    if Z == 0:
        assert cfg["architectures"] == [{QWEN3: "Qwen3MoeForCausalLM", GLM: "Glm4MoeLiteForCausalLM"}[family]]
        assert cfg["model_type"] == family and "zce_nums" not in cfg and "auto_map" not in cfg and py == []
    else:
        arch = {QWEN3: "Qwen3MoePlusPlusForCausalLM", GLM: "Glm4MoeLitePlusPlusForCausalLM"}[family]
        assert cfg["architectures"] == [arch]
        assert cfg["zce_nums"] == [Z] and cfg["zce_types"] == ["zero"] and cfg["use_zce_mask"] is False
        stem = {QWEN3: "qwen3_moe", GLM: "glm4_moe_lite"}[family]
        # config + modeling code, the shared helpers, and zeda_megatron/routing.py as zeda_routing.py
        assert py == sorted([f"configuration_{stem}_plus_plus.py", f"modeling_{stem}_plus_plus.py",
                             "zce_common.py", "zeda_routing.py"])
        assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        for f in py:  # the shipped code imports only torch, transformers and its sibling files
            tree = ast.parse(open(os.path.join(out, f)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots = {node.module.split(".")[0]}
                else:
                    continue
                # huggingface_hub is a dependency of transformers itself
                assert roots <= {"torch", "transformers", "huggingface_hub", "__future__", "math", "typing", "atexit", "json", "os"}, (f, roots)
    # tokenizer copied through
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == [1, 2]
    ref = mcore_logits(model, ids)
    got = hf_logits(out, ids, trust_remote_code=True)
    assert (got - ref).abs().max().item() <= TOL
    if Z:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
        gen = hf.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        assert gen.shape == (2, 7)
        # the null experts are live: not the original model; use_zce_mask recovers it
        assert (got - hf_logits(hf_dirs[family], ids)).abs().max().item() > 1e-3
        cfg["use_zce_mask"] = True
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f)
        masked = hf_logits(out, ids, trust_remote_code=True)
        assert (masked - hf_logits(hf_dirs[family], ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_identical(family, hf_dirs, tmp_path):
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.bridge.import_hf import import_hf

    m1, _ = import_hf(hf_dirs[family], num_null_experts=4, seed=9)
    save_hf_pretrained(m1, str(tmp_path / "a"))
    m2, report = import_hf(str(tmp_path / "a"))  # Z from zce_nums, rows from the checkpoint
    assert report["generated"] == []
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        if torch.is_tensor(s1[k]):
            assert torch.equal(s1[k], s2[k]), k
    save_hf_pretrained(m2, str(tmp_path / "b"))
    a, b = read_hf_tensors(str(tmp_path / "a")), read_hf_tensors(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Z = 0: export reproduces the original HF tensors bit for bit
    m0, _ = import_hf(hf_dirs[family])
    save_hf_pretrained(m0, str(tmp_path / "c"))
    orig, c = read_hf_tensors(hf_dirs[family]), read_hf_tensors(str(tmp_path / "c"))
    assert orig.keys() == c.keys() and all(torch.equal(orig[k], c[k]) for k in orig)


def _env():
    # init_parallel in this process put MASTER_PORT etc. in os.environ: the child needs its own
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _run(tool, *args):
    env = _env()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """Checkpoints with Z = E/2, fp32: GLM through the tools/convert_hf.py command, Qwen3 in-process."""
    from zeda_megatron.bridge.checkpoint import save_checkpoint
    from zeda_megatron.bridge.import_hf import import_hf
    from zeda_megatron.distributed import init_parallel

    root = tmp_path_factory.mktemp("ckpt")
    out = {fam: str(root / fam) for fam in FAMILIES}
    _run("convert_hf.py", "--hf-dir", hf_dirs[GLM], "--out", out[GLM], "--null-ratio", "0.5",
         "--seed", "21", "--dtype", "float32")
    init_parallel(tp=1, pp=1, ep=1)
    model, _ = import_hf(hf_dirs[QWEN3], null_ratio=0.5, seed=21)
    save_checkpoint(model, out[QWEN3], hf_dir=hf_dirs[QWEN3], seed=21)
    return out


def test_commands_convert_then_export(converted, hf_dirs, ids, tmp_path):
    from zeda_megatron.bridge.import_hf import import_hf

    fam = GLM
    out = str(tmp_path / "hf")
    _run("export_hf.py", "--checkpoint", converted[fam], "--out", out)
    ref, _ = import_hf(hf_dirs[fam], num_null_experts=4, seed=21)
    assert (hf_logits(out, ids, trust_remote_code=True) - mcore_logits(ref, ids)).abs().max().item() <= TOL
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))


def test_convert_command_errors(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_hf

    from zeda_megatron.bridge.hf_config import BridgeError

    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(BridgeError, match="model_type='mixtral'"):
        convert_hf.main(["--hf-dir", str(d), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("family,ep,pp,tp", [(GLM, 2, 1, 1), (QWEN3, 1, 2, 1), (GLM, 1, 1, 2)])
def test_export_multi_rank_matches_single(family, ep, pp, tp, converted, tmp_path):
    """The checkpoint (saved with TP=EP=PP=1) loads under EP=2 / PP=2 / TP=2; the per-rank export
    (TP shards gathered) equals the single-process one tensor for tensor."""
    from dist_helpers import run_distributed

    from zeda_megatron.bridge.checkpoint import assets_dir, load_checkpoint
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from bridge_fixtures import dist_export

    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    save_hf_pretrained(load_checkpoint(converted[family]), single, assets_dir=assets_dir(converted[family]))
    run_distributed(dist_export, 2, converted[family], multi, ep, pp, tp)
    assert os.path.isfile(os.path.join(multi, "model.safetensors.index.json"))
    a, b = read_hf_tensors(single), read_hf_tensors(multi)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.load(open(os.path.join(single, "config.json"))) == json.load(open(os.path.join(multi, "config.json")))
