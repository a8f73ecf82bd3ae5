"""The embedded default's pieces: corpus, tiny teacher (test preset), evaluation (zeda_megatron.eval) and
the adaptation report."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zeda_megatron.embedded import corpus
from zeda_megatron.embedded.teacher import build_teacher, is_built
from zeda_megatron.eval.models import plusplus_from_teacher
from zeda_megatron.eval.report import write_report
from zeda_megatron.eval.scoring import evaluate_model

QUIET = lambda *a: None  # noqa: E731
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher") / "glm")
    return d, build_teacher(d, family="glm", preset="test", seed=0, log=QUIET)


def test_corpus_deterministic():
    a, b = corpus.split_files(0), corpus.split_files(0)
    assert a == b and a[0] and a[1] and not set(a[0]) & set(a[1])
    assert corpus.split_files(1) != a
    assert corpus.training_texts(0, code_chars=20_000, arith_lines=200) == corpus.training_texts(
        0, code_chars=20_000, arith_lines=200)
    p = corpus.arithmetic_problems(50, 0)
    assert p == corpus.arithmetic_problems(50, 0) and p != corpus.arithmetic_problems(50, 1)
    for q in p:
        a_, op, b_, eq = q["prompt"].split()
        assert eq == "=" and str(eval(f"{a_}{op}{b_}")) == q["answer"]
    assert corpus.distill_prompts(20, 0) == corpus.distill_prompts(20, 0)
    held = corpus.heldout_code(0, n_chunks=4)
    assert held == corpus.heldout_code(0, n_chunks=4) and len(held) == 4


def test_prompt_files(tmp_path):
    path = corpus.write_prompts(str(tmp_path / "p.jsonl"), n=10, seed=0)
    rows = [json.loads(x) for x in open(path)]
    assert len(rows) == 10 and all(r["prompt"] for r in rows)
    assert any(r["prompt"].endswith("=") for r in rows) and any("\n" in r["prompt"] for r in rows)
    path = corpus.write_stage1_data(str(tmp_path / "t.jsonl"), mode="text", n=5)
    assert all(json.loads(x)["text"] for x in open(path))


def test_teacher_trained_and_loadable(teacher):
    d, info = teacher
    assert info["steps_done"] == info["settings"]["steps"]  # the whole schedule ran (no time budget cut it)
    # genuinely trained: far below a random model, below the unigram baseline
    assert info["heldout_nll"] < info["random_nll"] - 1.0
    assert info["heldout_nll"] < info["unigram_nll"]
    from transformers import AutoTokenizer

    from zeda_megatron.bridge.hf_config import model_info, read_config_json

    mi = model_info(read_config_json(d))
    assert mi.family == "glm4_moe_lite" and mi.num_experts % 2 == 0 and mi.moe_layers[0] == 0
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= mi.vocab_size
    # and it solves some arithmetic (greedy exact match; a random model solves none)
    from zeda_megatron.embedded import corpus
    from zeda_megatron.eval.scoring import arith_accuracy
    from zeda_megatron.embedded.hf_model import load

    model, tk = load(d)
    acc = arith_accuracy(model, tk, corpus.arithmetic_problems(100, 0, ops=("+", "-", "*")))
    assert acc >= 0.02, acc


def test_teacher_cached_and_deterministic(teacher, tmp_path):
    d, info = teacher
    again = build_teacher(d, family="glm", preset="test", seed=0, log=QUIET)
    assert again["cached"] and again["hash"] == info["hash"]  # the marker matched: nothing rebuilt
    assert is_built(d, "glm", "test", 0)
    # a short build twice: same weights; deleting the directory rebuilds it
    ov = {"steps": 4}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_teacher(a, "glm", "test", 0, overrides=ov, log=QUIET)
    build_teacher(b, "glm", "test", 0, overrides=ov, log=QUIET)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    shutil.rmtree(a)
    info_a = build_teacher(a, "glm", "test", 0, overrides=ov, log=QUIET)
    assert not info_a["cached"] and all(torch.equal(_weights(a)[k], wb[k]) for k in wb)


def test_evaluate_and_report(teacher, tmp_path):
    d, _ = teacher
    kw = dict(n_chunks=4, n_arith=8, dial=(), log=QUIET)
    s = evaluate_model(d, d, **kw)
    assert s["kl_teacher_student"] == pytest.approx(0, abs=1e-6) and s["teacher_nll"] == s["student_nll"]
    # a null-expert (PlusPlus) student, loaded with trust_remote_code: masked = the teacher exactly
    pm = plusplus_from_teacher(d, str(tmp_path / "pp_mask"), num_null=4, mask_null=True)
    s = evaluate_model(pm, d, **kw)
    assert s["kl_teacher_student"] < 1e-6 and s["null_share"] == 0
    pp = plusplus_from_teacher(d, str(tmp_path / "pp"), num_null=4, null_bias=0.5)
    s = evaluate_model(pp, d, **kw)
    assert 0 < s["null_share"] <= 1 and set(s["null_share_per_layer"]) == {"1"}
    assert s["expert_flops_removed_incl_shared"] < s["expert_flops_removed"]
    assert s["kl_teacher_student"] > 0
    assert any(v is not None for v in s["null_share_by_token_class"].values())
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps({"step": i, "loss": 3.0 / i, "kl": 0.1 / i, "null_share": 0.1 * i,
                                       "null_target": 0.5}) for i in range(1, 6)) + "\n")
    md = write_report(s, {"stage 1": str(m), "stage 2": str(m), "missing": "/nonexistent"}, str(tmp_path / "rep"))
    assert os.path.isfile(tmp_path / "rep" / "summary.json")
    text = open(md).read()
    assert "expert FLOPs removed" in text.lower() or "Routed expert FLOPs removed" in text
    pngs = [x for x in os.listdir(tmp_path / "rep") if x.endswith(".png")]
    assert {"curve_loss.png", "null_share_per_layer.png", "null_share_by_token_class.png"} <= set(pngs)
    assert all(p in text for p in pngs)


def test_make_tiny_teacher_cli_records_the_recipe(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "t"
    res = subprocess.run([sys.executable, "tools/make_tiny_teacher.py", "--preset", "test", "--steps", "4",
                          "--threads", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout.strip().splitlines()[-2])
    info = json.loads((out / "teacher_info.json").read_text())
    from zeda_megatron.embedded.teacher import settings_hash, weights_digest

    assert printed["hash"] == info["hash"] == settings_hash("glm", "test", 0, {"steps": 4}, threads=1)
    assert printed["weights_sha256"] == info["weights_sha256"] == weights_digest(str(out))
    assert info["threads"] == 1 and info["steps_done"] == 4 and info["command"].startswith("python tools/make_tiny_teacher.py")
    # --ship rebuilds only the shipped recipe, and says so before any work
    res = subprocess.run([sys.executable, "tools/make_tiny_teacher.py", "--ship", "--seed", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--ship rebuilds the shipped recipe" in res.stderr
