"""CI (CPU) side of the GPU smoke suite (tools/gpu_smoke.sh, tests/gpu):

* the GPU tests are collected and, without CUDA, skipped with the reason; the script exits 3 with a
  message where there is no GPU (after installing a given wheelhouse);
* the offline wheelhouse install (tools/wheelhouse.py): into a target folder from a local folder with no
  index (pip --no-index, proxies pointed at a closed port), torch left as it is although the wheelhouse
  offers another and a package requires it; a missing requirement stops before anything is installed,
  naming it and the download command (exit 4); the lock agrees with requirements.txt and setup.sh;
* the pieces the GPU checks rely on: stage-2 sample replay (tests/gpu/train_wrapped.py), the comparison's
  bounds (bf16 rounding stays well inside them; a wrong learning rate does not), the expert gradient
  names of both expert layouts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import smoke_runs as S  # noqa: E402
import wheelhouse as W  # noqa: E402

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
GPU_TESTS = ("test_te_spec_builds_and_matches_transformers", "test_grouped_gemm_equals_sequential_experts",
             "test_memory_plan_reads_this_gpu", "test_bf16_steps_equal_the_cpu_fp32_run",
             "test_save_resume_matches_uninterrupted", "test_export_reloads_with_the_checkpoint_logits",
             "test_two_gpus_equal_one_gpu", "test_mid_size_step_memory_against_plan_and_rehearsal",
             "test_bench_moe_layer", "test_bench_rollout")


# ---- collection and the script without a GPU ---------------------------------------------------------------
def test_gpu_tests_are_collected_and_skipped_with_the_reason():
    res = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rs", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    ids = [line for line in out.splitlines() if "::" in line and ("SKIPPED" in line or "PASSED" in line)]
    assert len(ids) == 15, out[-3000:]  # 2 TE builds, 2 grouped, plan, 2 stage chains, resume, export, 2 two-GPU, 2 mid-size, 2 benches
    for name in GPU_TESTS:
        assert name in out, (name, out[-3000:])
    if not torch.cuda.is_available():
        last = out.splitlines()[-1]
        assert "passed" not in last and "15 skipped" in last, last
        assert out.count("needs CUDA (no GPU here); run tools/gpu_smoke.sh on a GPU node") >= 1


def test_smoke_script_on_cpu_exits_with_the_message():
    res = subprocess.run(["bash", "tools/gpu_smoke.sh"], cwd=ROOT, env={**ENV, "ZEDA_FORCE_CPU": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3
    assert "gpu_smoke: no CUDA GPU available" in res.stderr and "nothing was run" in res.stderr


# ---- the offline wheelhouse -----------------------------------------------------------------------------------
def fake_wheel(folder, name: str, version: str, requires=()) -> str:
    """A minimal pure-Python wheel (one module exposing __version__)."""
    mod = name.replace("-", "_")
    path = os.path.join(str(folder), f"{mod}-{version}-py3-none-any.whl")
    info = f"{mod}-{version}.dist-info"
    files = {f"{mod}/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{p},sha256={digest},{len(text.encode())}")
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


@pytest.fixture
def wheelhouse(tmp_path):
    """A local wheelhouse: zeda-smoke-a needs torch (any) and zeda-smoke-b; a torch 99.0 wheel tempts pip."""
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    fake_wheel(wh, "zeda-smoke-a", "1.0", ["torch", "zeda-smoke-b==2.0"])
    fake_wheel(wh, "zeda-smoke-b", "2.0")
    fake_wheel(wh, "torch", "99.0")
    lock = tmp_path / "lock.txt"
    lock.write_text("# test lock\nzeda-smoke-a==1.0\nzeda-smoke-b==2.0\n")
    return wh, lock


def offline_env() -> dict:
    """No index and no way out: any network access by pip would fail."""
    env = {k: v for k, v in ENV.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", PYTHONPATH="")
    return env


def _torch_file(pythonpath: str) -> str:
    code = "import torch; print(torch.__version__, torch.__file__)"
    return subprocess.run([sys.executable, "-c", code], env={**offline_env(), "PYTHONPATH": pythonpath},
                          capture_output=True, text=True, check=True).stdout.strip()


def test_wheelhouse_installs_into_the_target_offline_and_leaves_torch(wheelhouse, tmp_path):
    wh, lock = wheelhouse
    target = tmp_path / "site"
    before = _torch_file("")
    res = subprocess.run([sys.executable, "tools/wheelhouse.py", "install", "--wheelhouse", str(wh), "--target",
                          str(target), "--lock", str(lock)], cwd=ROOT, env=offline_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(summary["installed"]) == ["zeda-smoke-a==1.0", "zeda-smoke-b==2.0"]
    assert summary["torch"] == torch.__version__
    names = sorted(os.listdir(target))
    assert "zeda_smoke_a" in names and "zeda_smoke_b" in names
    assert not any(n.lower().startswith("torch") for n in names), names  # torch 99.0 was offered, not taken
    assert _torch_file(str(target)) == before  # the site torch, unchanged, with the target on PYTHONPATH
    out = subprocess.run([sys.executable, "-c", "import zeda_smoke_a, zeda_smoke_b; print(zeda_smoke_a.__version__)"],
                         env={**offline_env(), "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "1.0", out.stderr
    again = subprocess.run([sys.executable, "tools/wheelhouse.py", "install", "--wheelhouse", str(wh), "--target",
                            str(target), "--lock", str(lock)], cwd=ROOT, env=offline_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["up_to_date"] is True


def test_wheelhouse_missing_requirement_stops_before_anything(wheelhouse, tmp_path):
    wh, lock = wheelhouse
    os.remove(wh / "zeda_smoke_b-2.0-py3-none-any.whl")
    target = tmp_path / "site"
    res = subprocess.run(["bash", "tools/gpu_smoke.sh", "--wheelhouse", str(wh), "--target", str(target),
                          "--lock", str(lock)], cwd=ROOT, env={**offline_env(), "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == W.EXIT_MISSING, res.stderr[-3000:]
    assert "lacks 1 requirement(s) this node needs: zeda-smoke-b==2.0" in res.stderr, res.stderr
    assert "pip download --no-deps" in res.stderr and str(lock) in res.stderr
    assert "nothing was installed and nothing was run" in res.stderr
    assert not target.exists() or not os.listdir(target)
    assert "gpu_smoke: no CUDA GPU" not in res.stderr  # stopped before the GPU check


def test_smoke_script_installs_the_wheelhouse_then_exits_3_without_cuda(wheelhouse, tmp_path):
    wh, lock = wheelhouse
    target = tmp_path / "site"
    res = subprocess.run(["bash", "tools/gpu_smoke.sh", "--wheelhouse", str(wh), "--target", str(target),
                          "--lock", str(lock)], cwd=ROOT,
                         env={**offline_env(), "PYTHON": sys.executable, "ZEDA_FORCE_CPU": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "gpu_smoke: no CUDA GPU available" in res.stderr
    assert {"zeda_smoke_a", "zeda_smoke_b"} <= set(os.listdir(target))


def test_wheelhouse_refuses_a_python_without_torch(tmp_path, wheelhouse):
    wh, lock = wheelhouse
    bare = tmp_path / "bare"  # a venv of the base interpreter: no torch
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    res = subprocess.run([str(bare / "bin" / "python"), "tools/wheelhouse.py", "install", "--wheelhouse", str(wh),
                          "--target", str(tmp_path / "site"), "--lock", str(lock)], cwd=ROOT, env=offline_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == W.EXIT_BAD_INPUT, res.stderr[-2000:]
    assert "has no torch" in res.stderr and "PYTHON=" in res.stderr


def test_lock_matches_requirements_and_setup():
    pins = W.read_lock()
    reqs = W.direct_requirements()
    assert not any(W.site_stack(n) for n in pins), "torch / triton / nvidia-* must never be in the lock"
    for line in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(.+)$", line)
        if m:  # an exact pin of requirements.txt (or megatron-core) is the lock's version
            assert pins.get(W.canonical(m.group(1))) == m.group(3).strip(), line
        else:
            assert W.canonical(re.split(r"[<>=!~\[ ;]", line)[0]) in pins, line
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        assert set(re.findall(r"megatron-core==[\d.]+", f.read())) == {W.MEGATRON_CORE}
    # the lock is this environment's closure (regenerate with `python tools/wheelhouse.py lock`)
    assert W.closure(reqs) == pins


def test_download_command_names_the_lock_and_the_python():
    cmd = W.download_command("3.12", "wh")
    assert cmd.startswith("python3 -m pip download --no-deps ")
    assert "--python-version 3.12" in cmd and "-d wh" in cmd and "-r tools/gpu_node_lock.txt" in cmd
    assert "--ignore-requires-python" in cmd  # megatron-core's wheel metadata on 3.11


# ---- the pieces the GPU checks use -------------------------------------------------------------------------------
def test_forced_tokens_follow_each_sequence():
    from types import SimpleNamespace as NS

    from train_wrapped import forced_tokens

    wanted = [[7, 8], [9]]
    # a step sampling sequence 1's first token and sequence 0's second (slots in any order), then a
    # position past sequence 1's response
    samples = [(0, 3, NS(index=1, sampled=0)), (1, 0, NS(index=0, sampled=1)), (2, 1, NS(index=1, sampled=1))]
    assert forced_tokens(wanted, samples, pad_id=0) == [9, 8, 0]


@pytest.mark.slow
def test_stage2_replay_forces_the_recorded_samples(tmp_path):
    """A stage-2 run replaying another's samples reproduces its metrics exactly (same device); replaying
    altered samples trains on those (the rollout check inside the wrapper) and changes the loss."""
    common = ["model=tiny_glm", "stage=opd", "trainer.max_steps=1", "stage.max_new_tokens=8"]
    a = S.train(tmp_path / "a", *common, cpu=True, threads=1, tokens=f"record:{tmp_path / 'tok'}")
    b = S.train(tmp_path / "b", *common, cpu=True, threads=1, tokens=f"replay:{tmp_path / 'tok'}")
    assert [(r["loss"], r["grad_norm"], r["null_share"]) for r in a] == [(r["loss"], r["grad_norm"], r["null_share"]) for r in b]
    src = tmp_path / "tok.rank0.jsonl"
    recs = [json.loads(line) for line in src.read_text().splitlines()]
    for rec in recs:
        rec["responses"] = [[(t + 1) % 256 + 1 for t in r] for r in rec["responses"]]
    (tmp_path / "alt.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = S.train(tmp_path / "c", *common, cpu=True, threads=1, tokens=f"replay:{tmp_path / 'alt'}")
    assert c[0]["loss"] != a[0]["loss"]


def _bf16_deviation(family: str, tmp_path) -> dict:
    """One forward/backward of a tiny model (null experts on) in bf16 and in fp32 on the CPU: the
    relative change of the loss and the gradient norm, and the change of the null share."""
    from bridge_fixtures import make_tiny_hf

    from zeda_megatron.bridge.import_hf import import_hf
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.mcore.moe_layer import NullExpertMoELayer

    hf = make_tiny_hf(family, str(tmp_path / family), seed=2)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(64).unsqueeze(0).expand(4, -1)
    out = {}
    init_parallel(seed=1)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model, _ = import_hf(hf, null_ratio=0.5, seed=3, params_dtype=dtype)
            layers = [m for m in model.modules() if isinstance(m, NullExpertMoELayer)]
            for m in layers:
                m.reset_routing_stats()
            logits = model(ids, pos, None).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
            stats = [m.routing_stats() for m in layers]
            share = sum(s["null_slots"] for s in stats) / max(1, sum(s["null_slots"] + s["real_assignments"] for s in stats))
            out[dtype] = (loss.item(), grad.item(), share)
    finally:
        destroy_parallel()
    (l32, g32, s32), (l16, g16, s16) = out[torch.float32], out[torch.bfloat16]
    return {"loss": abs(l16 - l32) / abs(l32), "grad_norm": abs(g16 - g32) / abs(g32), "null_share": abs(s16 - s32),
            "null_share_fp32": s32}


@pytest.mark.parametrize("family", ("glm4_moe_lite", "qwen3_moe"))
def test_bf16_rounding_stays_within_a_third_of_the_tolerance(family, tmp_path):
    d = _bf16_deviation(family, tmp_path)
    assert 0.0 < d["null_share_fp32"] < 1.0  # the null experts take part
    for key in ("loss", "grad_norm"):
        rel, _ = S.TOLERANCE[key]
        assert d[key] <= rel / 3, (key, d)
    assert d["null_share"] <= S.TOLERANCE["null_share"][1] / 3, d


@pytest.mark.slow
def test_comparison_fails_for_a_wrong_learning_rate(tmp_path):
    """The bounds admit bf16 rounding but not a real fault: the same stage-1 steps with 1.5x the
    learning rate fall outside them (and a run compared with itself is inside)."""
    common = ["model=tiny_glm", "stage=sft", "trainer.max_steps=3"]
    ref = S.train(tmp_path / "ref", *common, cpu=True, threads=1)
    assert not S.compare(ref, ref)["failures"]
    lr = 1.5 * 1e-3  # conf/model/tiny_glm.yaml reference_lr.sft
    bad = S.train(tmp_path / "bad", *common, f"optim.lr={lr}", cpu=True, threads=1)
    res = S.compare(ref, bad)
    assert res["failures"], S.format_comparison("lr x1.5", res)
    assert not any(f.startswith("step 1 loss") for f in res["failures"])  # step 1 runs before any update


def test_expert_parameter_names_of_both_layouts():
    grouped = "decoder.layers.1.mlp.experts.linear_fc1.weight3"
    sequential = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    assert S.expert_param_key(grouped) == S.expert_param_key(sequential) == "decoder.layers.1.mlp.experts.3.fc1"
    assert S.expert_param_key("decoder.layers.1.mlp.router.weight") == "decoder.layers.1.mlp.router.weight"
    assert S.expert_param_key("decoder.layers.1.self_attention.linear_qkv.weight") is None
    a = {"x.experts.0.fc1": torch.ones(2, 2), "x.experts.1.fc1": torch.zeros(2, 2)}
    assert S.compare_grads(a, {k: v.clone() for k, v in a.items()}) == []
    assert S.compare_grads(a, {"x.experts.0.fc1": torch.ones(2, 2) * 1.1, "x.experts.1.fc1": torch.zeros(2, 2)})
    assert S.compare_grads(a, {"x.experts.0.fc1": torch.ones(2, 2), "x.experts.1.fc1": torch.ones(2, 2)})
