"""The time plan (zeda_megatron.plan.time): ``python -m zeda_megatron.plan ... gpu=h100`` prints it with
the memory plan and its JSON line carries ``time_plan`` with every phase of the Slurm job (stage 2
also its sample and train seconds per step and decode tokens/s); it follows the GPU table, the
length distribution (``--lengths``) and ``--time`` (job runs, requeues); and its method, run with a
spec of this CPU measured in the same run, predicts the tiny models' training and decode steps
within 2x both ways (tools/bench_time_plan.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
REF = ["model=glm47_flash", "parallel=reference_8gpu", "stage=opd"]
PHASES = ("check", "rehearse", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate")


def _cli(*args):
    res = subprocess.run([sys.executable, "-m", "zeda_megatron.plan", *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    return res


def test_plan_prints_the_time_plan_and_its_json():
    res = _cli(*REF, "gpu=h100", "--time", "2-00:00:00")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "memory plan: glm47_flash" in res.stdout and "time plan on NVIDIA H100 SXM5 80GB" in res.stdout
    out = json.loads(res.stdout.strip().splitlines()[-1])
    tp = out["time_plan"]
    assert tuple(tp) == PHASES and all(tp[p]["hours"] > 0 for p in PHASES)
    opd = tp["opd"]
    assert opd["sample_s"] > 0 and opd["train_s"] > 0 and opd["decode_tokens_per_s"] > 0
    assert opd["hours"] >= opd["steps"] * (opd["sample_s"] + opd["train_s"]) / 3600
    assert opd["steps"] == 321 and opd["decode_batch"] == 16  # the reference's steps; the whole share in flight
    assert tp["sft"]["steps"] == 469  # one pass over 60,000 prompts at 128 per step, as the Slurm job sets it
    summ = out["time_summary"]
    assert abs(summ["total_hours"] - sum(tp[p]["hours"] for p in PHASES)) < 1e-6
    r = summ["requeues"]
    assert r["time_hours"] == 48 and r["job_runs"] == -(-summ["total_hours"] // (48 - 0.5))
    assert r["requeues"] == r["job_runs"] - 1
    assert "requeues" in res.stdout and "| opd |" in res.stdout
    assert out["gpu_capacity_bytes"] == 80 * 10**9  # gpu=h100 plans the memory against its 80 GB


def _times(gpu, **kw):
    from zeda_megatron.plan.time import time_plan_for

    return time_plan_for(REF, gpu, **kw)[1]


def test_time_plan_follows_the_gpu_and_the_lengths(tmp_path):
    h100, h200, a100 = _times("h100"), _times("h200"), _times("a100")
    # H200: the same FLOP/s, more memory and bandwidth -> more generation slots, fewer hours
    assert h200["time_plan"]["generate"]["decode_batch"] > h100["time_plan"]["generate"]["decode_batch"]
    assert h200["time_plan"]["generate"]["hours"] < h100["time_plan"]["generate"]["hours"]
    assert h200["time_plan"]["sft"]["step_s"] <= h100["time_plan"]["sft"]["step_s"]
    # A100: a third of the FLOP/s: a slower training step
    assert a100["time_plan"]["sft"]["step_s"] > 1.5 * h100["time_plan"]["sft"]["step_s"]
    # real responses, 10x shorter than the assumed distribution: much less sampling
    short = tmp_path / "responses.jsonl"
    short.write_text("".join(json.dumps({"prompt": "p" * 400, "response": "r" * 2400}) + "\n" for _ in range(50)))
    real = _times("h100", lengths_path=str(short))
    assert real["time_summary"]["mean_response"] == 600
    assert real["time_plan"]["generate"]["hours"] < 0.2 * h100["time_plan"]["generate"]["hours"]
    assert real["time_plan"]["opd"]["sample_s"] < 0.2 * h100["time_plan"]["opd"]["sample_s"]
    assert str(short) in real["time_summary"]["lengths"]


def test_bad_inputs_are_named(capsys):
    from zeda_megatron.plan.__main__ import main

    assert main([*REF, "gpu=v100"]) == 2
    err = capsys.readouterr().err
    assert "gpu='v100'" in err and "h100" in err
    assert main([*REF, "gpu=h100", "--lengths", "/nonexistent/responses.jsonl"]) == 2
    assert "/nonexistent/responses.jsonl" in capsys.readouterr().err
    assert main([*REF, "gpu=h100", "--time", "soon"]) == 2
    assert "--time='soon'" in capsys.readouterr().err


def test_slurm_time_limits():
    from zeda_megatron.plan.time import parse_time_limit

    assert parse_time_limit("48") == 48 and parse_time_limit("2-00:00:00") == 48
    assert parse_time_limit("12:30:00") == 12.5 and parse_time_limit("1-06") == 30
    with pytest.raises(ValueError, match="--time"):
        parse_time_limit("tomorrow")


@pytest.mark.slow
def test_calibration_on_this_cpu_within_2x():
    """Predicted / measured step and decode times of the tiny GLM and Qwen3 models, with this CPU's
    spec measured in the same run: every ratio within 2x both ways."""
    res = subprocess.run([sys.executable, "tools/bench_time_plan.py", "--hidden", "192", "--seq", "192",
                          "--decode-steps", "16"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out["ratios"]) == {"glm_train_step", "glm_decode_step", "qwen_train_step", "qwen_decode_step"}
    assert out["max_ratio"] <= 2.0, res.stdout[-2000:]
    assert "| glm | decode_step |" in res.stdout
