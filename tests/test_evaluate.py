"""Evaluation (zeda_megatron.eval and its command, python -m zeda_megatron.evaluate), the compute dial,
baselines' routing transforms, lm-eval on the shipped task files, and the two benchmarks, on the
test-preset teacher."""

import json
import os
import subprocess
import sys

import pytest
import torch

from zeda_megatron.embedded.teacher import build_teacher
from zeda_megatron.eval import baselines as bl
from zeda_megatron.eval import data as evdata
from zeda_megatron.eval import models as evm
from zeda_megatron.eval import scoring as ev
from zeda_megatron.eval.models import plusplus_from_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    teacher = str(root / "teacher")
    build_teacher(teacher, family="glm", preset="test", seed=0, threads=1, log=QUIET)
    # a null-expert model that is not the teacher: 2 untrained null experts (router rows 0)
    student = plusplus_from_teacher(teacher, str(root / "student"), num_null=2, mask_null=False)
    return teacher, student, root


@pytest.fixture(scope="module")
def loaded(dirs):
    teacher, student, _ = dirs
    t = evm.load(teacher)
    data = evdata.eval_data(t[1], seed=0, n_chunks=6, n_arith=60)
    return t, evm.load(student), data, ev.teacher_reference(*t, data)


def test_dial_monotone_and_bias_zero_is_the_model(loaded):
    t, s, data, ref = loaded
    plain = ev.score(*s, data, ref)
    rows = ev.sweep_dial(*s, data, ref, biases=[2.0, -2.0, 0.0, 1.0, -1.0, 4.0], log=QUIET)
    assert [r["bias"] for r in rows] == [-2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
    shares = [r["expert_flops_removed"] for r in rows]
    assert all(a <= b for a, b in zip(shares, shares[1:])), shares  # monotone in FLOPs
    assert shares[0] < shares[-1] and shares[-1] > 0.4
    zero = rows[2]
    for k in ("expert_flops_removed", "nll", "kl", "arith_acc"):
        assert zero[k] == plain[k], k  # bias 0 reproduces the model
    assert all(abs(m.zce_logit_bias) == 0.0 for _, m in evm.null_blocks(s[0]))  # reset after the sweep
    # the exported config field is what the remote code reads
    b = ev.calibrate_bias(s[0], data, 0.5)
    evm.set_null_logit_bias(s[0], b)
    assert abs(ev.null_share(s[0], data) - 0.5) < 0.1


def test_exported_config_exposes_the_dial(dirs, loaded, tmp_path):
    teacher, student, _ = dirs
    _, s, data, ref = loaded
    cfg = json.load(open(os.path.join(student, "config.json")))
    assert cfg["zce_logit_bias"] == 0.0 and cfg["n_routed_experts"] == cfg["num_local_experts"] == 4
    d = tmp_path / "biased"
    import shutil

    shutil.copytree(student, d)
    cfg["zce_logit_bias"] = 1.5
    (d / "config.json").write_text(json.dumps(cfg))
    m, tok = evm.load(str(d))
    assert all(blk.zce_logit_bias == 1.5 for _, blk in evm.null_blocks(m))
    evm.set_null_logit_bias(s[0], 1.5)
    try:
        assert ev.null_share(m, data) == ev.null_share(s[0], data)
    finally:
        evm.set_null_logit_bias(s[0], 0.0)
    assert ev.null_share(m, data) > ev.null_share(s[0], data)


def test_training_free_baselines_hit_the_target(dirs, loaded):
    teacher, _, root = dirs
    t, _, data, ref = loaded
    pp_dir = plusplus_from_teacher(teacher, str(root / "orig_pp"), num_null=1, mask_null=True)
    pp, tok = evm.load(pp_dir)
    # the masked PlusPlus teacher is the teacher, bit for bit
    assert ev.score(pp, tok, data, ref, arith=False)["kl"] == pytest.approx(0.0, abs=1e-6)
    bl.route_with_input(pp)
    try:
        k1 = ev.score(pp, tok, data, ref, transform=bl.strip(bl.static_topk(1)), arith=False)
        assert k1["expert_flops_removed"] == pytest.approx(0.5)  # K=2 -> 1
        assert k1["kl"] > 0
        for make, inc in ((bl.top_p, False), (bl.threshold, True)):
            p = bl.bisect_param(pp, data, make, 0.3, 0.0, 1.0, increasing=inc)
            share = ev.null_share(pp, data, transform=bl.strip(make(p)))
            assert abs(share - 0.3) < 0.08, (make.__name__, p, share)
    finally:
        bl.unpatch(pp)


def test_checkpoint_without_null_experts_reports_zero_and_teacher_figures(dirs, tmp_path):
    teacher, _, _ = dirs
    ckpt = tmp_path / "ckpt"
    res = subprocess.run([sys.executable, "tools/convert_hf.py", "--hf-dir", teacher, "--out", str(ckpt),
                          "--null-experts", "0", "--dtype", "float32"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "-m", "zeda_megatron.evaluate", "model=embedded_glm", f"model.hf_dir={teacher}",
                          f"evaluate.student={ckpt}", "evaluate.heldout_chunks=4", "evaluate.arith_problems=40",
                          f"hydra.run.dir={out}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    s = json.loads((out / "eval.json").read_text())
    assert s["num_null_experts"] == 0 and s["expert_flops_removed"] == 0 and s["expert_flops_removed_incl_shared"] == 0
    assert s["student_nll"] == pytest.approx(s["teacher_nll"], rel=1e-4)
    assert s["kl_teacher_student"] < 1e-4 and s["student_arith_acc"] == s["teacher_arith_acc"]
    assert "expert FLOPs removed" in (out / "eval.md").read_text()


def test_lm_eval_on_the_shipped_tasks_reports_null_share(dirs, tmp_path):
    from zeda_megatron.eval.harness import run_lm_eval

    _, student, _ = dirs
    res = run_lm_eval(student, out_dir=str(tmp_path / "lm"), limit=8)
    assert set(res["scores"]) == {"zeda_arith", "zeda_code"}
    assert 0.0 <= res["scores"]["zeda_arith"]["exact_match"] <= 1.0
    assert res["scores"]["zeda_code"]["bits_per_byte"] > 0
    assert res["routed_slots"] > 0 and 0.0 < res["routed_null_share"] < 1.0


def test_harness_command_writes_the_shipped_data(tmp_path):
    res = subprocess.run([sys.executable, "-m", "zeda_megatron.harness", "--write-data", str(tmp_path)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("arith_heldout.jsonl", "code_heldout.jsonl"):
        assert (tmp_path / name).read_text() == open(os.path.join(ROOT, "lm_eval_tasks", "data", name)).read(), name


def test_shipped_arith_data_is_the_evaluation_set():
    from zeda_megatron.embedded import corpus

    rows = [json.loads(x) for x in open(os.path.join(ROOT, "lm_eval_tasks", "data", "arith_heldout.jsonl"))]
    assert len(rows) == 500 and rows == [{"prompt": p["prompt"], "answer": p["answer"]}
                                         for p in corpus.arithmetic_problems(500, 0)]


def test_bench_generate_prints_speedups(dirs):
    teacher, student, root = dirs
    # the untrained null experts route ~10%: the dial brings the bench model to ~50%
    res = subprocess.run([sys.executable, "tools/bench_generate.py", "--model", student, "--teacher", teacher,
                          "--reps", "1", "--new-tokens", "4", "--prompt-len", "32", "--null-logit-bias", "1.5"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for k in ("prefill_speedup", "decode_speedup", "routed_null_share"):
        assert isinstance(out[k], float) and out[k] > 0, k
    assert set(out["per_batch"]) == {"1", "16"} and out["routed_null_share"] > 0.2


def test_bench_step_prints_the_teacher_overhead():
    res = subprocess.run([sys.executable, "tools/bench_step.py", "--steps", "3", "--", "model=tiny_glm",
                          "trainer.global_batch_size=2", "trainer.micro_batch_size=2"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher overhead ratio:" in res.stdout
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["teacher_overhead_ratio"] > 0 and out["distill_step_s"] > 0


def test_plusplus_counters(loaded):
    _, s, data, _ = loaded
    from zeda_megatron.bridge.remote_code.zce_common import reset_routing_stats, routing_stats

    reset_routing_stats(s[0])
    with torch.no_grad():
        s[0](input_ids=torch.tensor([data.ids[0]]))
    st = routing_stats(s[0])
    assert st["slots"] == len(data.ids[0]) * 2 * len(evm.null_blocks(s[0]))
    assert 0 <= st["null_slots"] <= st["slots"]


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
def test_exported_config_carries_every_expert_count_key(family, tmp_path):
    import shutil

    from transformers import AutoConfig, Glm4MoeLiteConfig, Qwen3MoeConfig

    from zeda_megatron.bridge.export_hf import EXPERT_COUNT_KEYS, hf_config_dict
    from zeda_megatron.bridge.hf_config import model_info
    from zeda_megatron.bridge.remote_code import FILES, ROUTING_FILE

    common = dict(num_experts_per_tok=2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, moe_intermediate_size=32)
    raw = (Qwen3MoeConfig(num_experts=8, head_dim=16, **common) if family == "qwen3_moe" else
           Glm4MoeLiteConfig(n_routed_experts=8, n_shared_experts=1, **common)).to_dict()
    for z in (0, 4):
        cfg = hf_config_dict(model_info(raw), z)
        for key in EXPERT_COUNT_KEYS[family]:
            assert cfg[key] == 8, (key, z)  # real experts only: null experts have no weights
        assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["zce_nums"] == [4] and cfg["zce_logit_bias"] == 0.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src = os.path.join(ROOT, "zeda_megatron", "bridge", "remote_code")
    for fn in FILES[family]:
        shutil.copy2(os.path.join(src, fn), tmp_path / fn)
    shutil.copy2(ROUTING_FILE[1], tmp_path / ROUTING_FILE[0])
    loaded = AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert loaded.num_local_experts == 8 and loaded.zce_logit_bias == 0.0 and loaded.zce_nums == [4]
