"""The distillation job end to end: both stages under EP=2 and PP=2 (gloo, 2 processes), PP=2 equals
PP=1, kill and resume equals an uninterrupted run, bad configs fail before training."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
COMMON = ["trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.seq_length=32",
          "trainer.verify_teacher=true", "logging.progress=true"]


def _cmd(nproc, run_dir, *overrides):
    launcher = [sys.executable, "-m", "zeda_megatron.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(_port()), "-m", "zeda_megatron.train"]
    return launcher + [f"hydra.run.dir={run_dir}", *COMMON, *overrides]


def _port():
    from zeda_megatron.distributed import free_port

    return free_port()


def train(nproc, run_dir, *overrides, timeout=600):
    res = subprocess.run(_cmd(nproc, run_dir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    return res


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize("model, parallel", [("tiny_glm", "ep2"), ("tiny_qwen3", "pp2")])
def test_both_stages_end_to_end(tmp_path, model, parallel):
    sft_dir, opd_dir = tmp_path / "sft", tmp_path / "opd"
    res = train(2, sft_dir, f"model={model}", f"parallel={parallel}", "stage=sft", "trainer.max_steps=16",
                "model.group_loss_coeff=1.0")
    assert "step 16/16" in res.stdout
    rows = metrics(sft_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("loss", "kl", "null_share", "expert_flops_removed", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert _mean(rows[-4:], "loss") < _mean(rows[:4], "loss")
    target = rows[0]["null_target"]
    assert abs(_mean(rows[-4:], "null_share") - target) < abs(rows[0]["null_share"] - target)
    assert summary(sft_dir)["teacher_unchanged"] is True
    assert os.path.isfile(os.path.join(sft_dir, "config.yaml"))

    train(2, opd_dir, f"model={model}", f"parallel={parallel}", "stage=opd", "trainer.max_steps=6",
          f"model.init_checkpoint={sft_dir}/checkpoints", "stage.max_new_tokens=8", "optim.lr=3e-4")
    rows = metrics(opd_dir)
    assert len(rows) == 6 and all(r["kl"] >= 0 for r in rows)
    assert _mean(rows[-2:], "kl") < _mean(rows[:2], "kl")
    assert summary(opd_dir)["teacher_unchanged"] is True

    # the run's checkpoints folder exports like a converted checkpoint (null experts -> PlusPlus)
    hf_out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(opd_dir / "checkpoints"),
                          "--out", str(hf_out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_out, trust_remote_code=True)
    assert "PlusPlus" in type(hf).__name__
    out = hf(torch.randint(0, 256, (1, 12))).logits
    assert torch.isfinite(out).all()


def test_pp2_matches_pp1(tmp_path):
    a, b = tmp_path / "pp1", tmp_path / "pp2"
    args = ("model=tiny_qwen3", "stage=sft", "trainer.max_steps=3", "stage.kl_weight=0.5")
    train(1, a, *args, "parallel=single", "trainer.global_batch_size=2")
    train(2, b, *args, "parallel=pp2", "trainer.global_batch_size=2")
    la, lb = metrics(a), metrics(b)
    for ra, rb in zip(la, lb):
        for key in ("loss", "nll", "kl", "null_share", "group_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (key, ra, rb)


def test_activation_recompute_gives_the_same_losses(tmp_path):
    args = ("model=tiny_glm", "stage=sft", "trainer.max_steps=2", "trainer.global_batch_size=2")
    train(1, tmp_path / "a", *args)
    train(1, tmp_path / "b", *args, "trainer.recompute=true")
    for ra, rb in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6) and ra["kl"] == pytest.approx(rb["kl"], rel=1e-5)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ("model=tiny_qwen3", "stage=sft", "trainer.max_steps=40", "trainer.global_batch_size=2")
    train(1, full, *args)
    proc = subprocess.Popen(_cmd(1, killed, *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    path = os.path.join(killed, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.isfile(path) and len(open(path).read().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before preemption
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    interrupted = summary(killed)["steps_done"]
    assert 2 <= interrupted < 40, out[-2000:]
    # a fresh start into that folder is refused and overwrites nothing
    res = subprocess.run(_cmd(1, killed, *args, "trainer.resume=never"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "trainer.resume=never" in res.stderr
    assert len(metrics(killed)) == interrupted
    train(1, killed, *args)  # same folder: resumes from its latest checkpoint
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), (ra["step"], ra["loss"], rb["loss"])
        assert ra["null_share"] == pytest.approx(rb["null_share"], abs=1e-9)


@pytest.mark.parametrize("override, key", [
    ("stage=distill", "stage"),
    ("parallel.ep=3", "parallel.ep"),
    ("stage.kl=topk", "stage.kl"),
    ("trainer.global_batch_size=3", "trainer.global_batch_size"),
])
def test_bad_config_fails_before_training(tmp_path, override, key):
    res = subprocess.run(_cmd(1, tmp_path / "bad", "model=tiny_qwen3", override), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert key.split(".")[0] in err, err[-2000:]
    assert not os.path.isfile(os.path.join(tmp_path, "bad", "metrics.jsonl"))
