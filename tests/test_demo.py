"""The main job (python -m zeda_megatron.demo) end to end on the small test preset: all six steps,
the report, reuse on re-run, and a rebuild of the (deterministic) teacher after deleting the cache."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}


def _run(out, cache):
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "zeda_megatron.demo", "--preset", "test", "--sft-steps", "20", "--opd-steps", "4",
         "--prompts", "64", "--eval-chunks", "8", "--arith-problems", "100", "--no-teacher-steps", "12", "--out", str(out), "--cache", str(cache)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-4000:])
    return res.stdout, time.time() - t0


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_main_job_runs_reuses_and_rebuilds(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    stdout, first = _run(out, cache)
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    for key in ("expert_flops_removed", "expert_flops_removed_incl_shared", "teacher_nll", "student_nll",
                "teacher_arith_acc", "student_arith_acc", "null_share_per_layer", "null_share_by_token_class"):
        assert key in summary, key
    # the bar, on the smaller test-preset teacher: >= 40% of routed expert work removed
    # with held-out NLL within 10% of the teacher's (the embedded default's figures: docs/quality.md)
    assert summary["expert_flops_removed"] >= 0.40, summary["expert_flops_removed"]
    assert summary["student_nll"] <= 1.10 * summary["teacher_nll"], (summary["student_nll"], summary["teacher_nll"])
    assert summary["teacher_unchanged"] == {"sft": True, "opd": True}
    md = (report / "report.md").read_text()
    assert "expert flops removed" in md.lower() and "null share" in md.lower()
    pngs = [f for f in os.listdir(report) if f.endswith(".png")]
    assert pngs and all(f in md for f in pngs)
    assert f"Report: {report / 'report.md'}" in stdout
    # the baseline table at matched expert FLOPs (runs/demo/report/baselines.json)
    rows = json.loads((report / "baselines.json").read_text())
    for r in rows:
        for key in ("method", "expert_flops_removed", "routed_null_share", "nll", "kl", "arith_acc"):
            assert key in r, (key, r)
    methods = [r["method"] for r in rows]
    assert methods[0] == "teacher" and methods[-1] == "ZEDA stages 1+2", methods
    for prefix in ("static top-", "top-p", "threshold", "ZEDA stage 1 only", "null experts, no teacher"):
        assert any(m.startswith(prefix) for m in methods), prefix
    zeda = rows[-1]
    assert zeda["expert_flops_removed"] == summary["expert_flops_removed"]
    free = [r for r in rows if r["method"].startswith(("top-p", "threshold"))]
    trained = [r for r in rows if "dial to matched FLOPs" in r["method"]]
    for r in free + trained:  # matched expert FLOPs
        assert abs(r["expert_flops_removed"] - zeda["expert_flops_removed"]) < 0.03, r
    # The test preset's teacher is too weak to rank methods against training-free routing (1% arithmetic,
    # NLL 5.04: top-p routing over its router lands within 0.1% of ZEDA's NLL either way, depending on
    # the thread count); the demo's finished teacher does (docs/quality.md: ZEDA ahead of every
    # training-free baseline in arithmetic, the threshold router ahead in NLL and KL). What holds here
    # with a wide margin: at matched FLOPs, distillation keeps the model
    # closer to the teacher than training the null experts on plain NLL, and stage 2 closes more of the
    # gap than stage 1 alone.
    by = {r["method"]: r for r in rows}
    stage1 = next(r for m, r in by.items() if m.startswith("ZEDA stage 1 only") and "dial" in m)
    no_teacher = next(r for m, r in by.items() if m.startswith("null experts, no teacher") and "dial" in m)
    assert zeda["kl"] < 0.75 * stage1["kl"] and zeda["kl"] < 0.75 * no_teacher["kl"], (zeda, stage1, no_teacher)
    assert "Baselines at matched expert FLOPs" in md and "quality_vs_flops.png" in md
    # the compute dial: monotone in FLOPs, bias 0 = the adapted model's own figures
    dial = summary["dial"]
    shares = [r["expert_flops_removed"] for r in dial]
    assert shares == sorted(shares) and shares[0] < summary["expert_flops_removed"] < shares[-1]
    zero = next(r for r in dial if r["bias"] == 0.0)
    assert zero["nll"] == summary["student_nll"] and zero["arith_acc"] == summary["student_arith_acc"]
    assert summary["arith_problems"] == 100
    for stage in ("sft", "opd"):
        assert len((out / stage / "metrics.jsonl").read_text().splitlines()) == {"sft": 20, "opd": 4}[stage]

    # re-running reuses every step
    teacher_dir = next(p for p in cache.iterdir() if p.name.startswith("teacher_"))
    weights = _digest(teacher_dir / "model.safetensors")
    stdout2, second = _run(out, cache)
    assert stdout2.count("reused") >= 5, stdout2
    assert second < first / 2, (first, second)

    # deleting the cache rebuilds the teacher, bit for bit
    shutil.rmtree(cache)
    stdout3, _ = _run(out, cache)
    assert "trained:" in stdout3
    assert _digest(teacher_dir / "model.safetensors") == weights
