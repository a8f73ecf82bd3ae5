"""tools/convert_hf.py keeps the source checkpoint's dtype by default (an fp32 checkpoint stays fp32
through convert -> export, logits equal at 1e-4); --dtype changes it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from bridge_fixtures import hf_logits, make_tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _env():
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
                                                                     "PYTHONWARNINGS": "ignore"}


def _run(tool, *args):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weight_dtypes(hf_dir: str) -> set[str]:
    out = set()
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            with open(os.path.join(hf_dir, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            out |= {m["dtype"] for k, m in header.items() if k != "__metadata__"}
    return out


@pytest.fixture(scope="module")
def fp32_source(tmp_path_factory):
    d = make_tiny_hf("glm4_moe_lite", str(tmp_path_factory.mktemp("src") / "hf"), seed=4)
    assert weight_dtypes(d) == {"F32"}
    return d


def test_fp32_checkpoint_stays_fp32_through_convert_and_export(fp32_source, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    res = _run("convert_hf.py", "--hf-dir", fp32_source, "--out", ckpt)
    assert "parameter dtype: float32 (the source's)" in res.stderr
    with open(os.path.join(ckpt, "zeda_bridge.json")) as f:
        assert json.load(f)["params_dtype"] == "float32"
    _run("export_hf.py", "--checkpoint", ckpt, "--out", out)
    assert weight_dtypes(out) == {"F32"}
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported.get("dtype", exported.get("torch_dtype", "float32")) == "float32"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (hf_logits(out, ids) - hf_logits(fp32_source, ids)).abs().max().item()
    assert diff <= TOL, diff


def test_dtype_flag_converts(fp32_source, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_hf

    assert convert_hf.source_dtype(fp32_source) == "float32"
    ckpt = str(tmp_path / "ckpt")
    res = _run("convert_hf.py", "--hf-dir", fp32_source, "--out", ckpt, "--dtype", "bfloat16")
    assert "parameter dtype: bfloat16" in res.stderr and "(the source's)" not in res.stderr
    with open(os.path.join(ckpt, "zeda_bridge.json")) as f:
        assert json.load(f)["params_dtype"] == "bfloat16"  # what export_hf writes by default
