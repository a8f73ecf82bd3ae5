"""The fake-tensor rehearsal (python -m zeda_megatron.rehearse, docs/rehearsal.md): the released models at
full size at parallel=reference_8gpu, planned vs measured within bounds; a layout that does not fit is
reported so by plan and rehearsal; a layout the model cannot run is refused naming the setting; at a tiny
size the rehearsal's bytes equal a real run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
REFERENCE = ("parallel=reference_8gpu",)


def spec_of(*overrides, on_gpu=True, gpu_gb=80):
    from zeda_megatron.spec import compose, resolve

    return resolve(compose(list(overrides), run_dir="/tmp/zeda-rehearse-test"), None, inputs=False, on_gpu=on_gpu,
                   gpu_gb=gpu_gb)


def run_cli(*args, timeout=1500):
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "zeda_megatron.rehearse", *args], capture_output=True, text=True,
                         env=ENV, cwd=ROOT, timeout=timeout)
    return out, time.time() - t0


# ---- (a) both released models x both stages at full size ----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_full_size_rehearsal_agrees_with_the_plan(stage):
    """Both released models at once (two processes: one per core; each rehearsal is single-threaded)."""
    from zeda_megatron.rehearse import PART_BOUND, PEAK_BOUND

    # stage 2: the sampler's first 3 forwards (the whole cache is allocated at the first, whose prompt chunks
    # fill the token budget; the next add decode tokens and their sampling): the same bytes as prefilling
    # all 16 slots and decoding (checked: GLM 34,979,489,408 vs 34,985,845,480), a third less time
    lean = ("sampler_steps=3",) if stage == "opd" else ()
    t0 = time.time()
    procs = {model: subprocess.Popen([sys.executable, "-m", "zeda_megatron.rehearse", f"model={model}", *REFERENCE,
                                      f"stage={stage}", *lean], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV, cwd=ROOT)
             for model in ("glm47_flash", "qwen3_30b_a3b")}
    outs = {model: p.communicate(timeout=1500) for model, p in procs.items()}
    print(f"\n{stage}: both models in {time.time() - t0:.0f} s")
    for model, (stdout, stderr) in outs.items():
        assert procs[model].returncode == 0, (model, stdout[-3000:] + stderr[-3000:])
        report = json.loads(stdout.strip().splitlines()[-1])
        print(f"{model} {stage}: wall {report['wall_s']:.0f} s\n" + stdout)
        assert report["fits"] and report["plan_fits"] and report["ranks"], model
        for r in report["ranks"]:
            planned, measured = r["planned_bytes"], r["measured_bytes"]
            # the parameters and the DDP grad buffer are exact, not just within bounds
            for part in ("student_params", "teacher_params", "student_grads"):
                assert measured[part] == planned[part], (model, part)
            for part, p in planned.items():
                if max(p, measured[part]) >= 256 * 2**20:
                    assert abs(measured[part] / p - 1) <= PART_BOUND, (model, part, p, measured[part])
            assert abs(r["measured_peak"] / r["planned_peak"] - 1) <= PEAK_BOUND, model
            if stage == "opd":
                assert measured["rollout_kv_cache"] > 10 * 2**30  # the cache sized for the whole 36,864 positions
        assert report["within_bounds"], model


# ---- (b) a layout that does not fit: stage 1 without recompute and without the optimizer offload --------
# (through the Slurm job's rehearse phase: section (e))


# ---- (c) a layout the model cannot run: refused before anything is built, naming the setting -------------
def test_a_layout_the_model_cannot_run_is_refused_by_plan_rehearsal_and_trainer(tmp_path):
    from omegaconf import OmegaConf

    from zeda_megatron.spec import ConfigError, compose
    from zeda_megatron.training.validate import validate_config

    bad = ("model=qwen3_30b_a3b", *REFERENCE, "stage=sft", "parallel.tp=8")  # Qwen3 has 4 KV heads
    out, _ = run_cli(*bad, timeout=300)
    assert out.returncode == 2 and "parallel.tp=8" in out.stderr and "num_key_value_heads" in out.stderr
    plan = subprocess.run([sys.executable, "-m", "zeda_megatron.plan", *bad], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)
    assert plan.returncode == 2 and "parallel.tp=8" in plan.stderr
    hf = OmegaConf.to_container(compose(list(bad), run_dir=".").model.hf_config, resolve=True)
    (tmp_path / "config.json").write_text(json.dumps(hf))  # the trainer's check comes before any weight is read
    with pytest.raises(ConfigError, match="parallel.tp=8"):
        validate_config(compose([*bad, f"model.hf_dir={tmp_path}", "trainer.save_dir=/tmp/x"], run_dir="."), 8)
    out, _ = run_cli("model=glm47_flash", *REFERENCE, "stage=sft", "parallel.ep=3", "parallel.gpus=12", timeout=300)
    assert out.returncode == 2 and "parallel.ep=3 does not divide the number of experts E=64" in out.stderr


# ---- (d) at a tiny size the rehearsal measures what a real run allocates ---------------------------------
def test_tiny_rehearsal_equals_a_real_run():
    from zeda_megatron.rehearse import measure_in_process

    # every routed slot real in the real run too (mask: route as if there were no null experts), which is
    # the rehearsal's worst-case assumption
    spec = spec_of("model=tiny_glm", "parallel=single", "stage=sft", "trainer.micro_batch_size=2",
                   "trainer.seq_length=128", "trainer.global_batch_size=2", "model.null_experts.mask=true",
                   on_gpu=False, gpu_gb=None)
    fake = measure_in_process(spec, 0, fake=True)
    real = measure_in_process(spec, 0, fake=False)
    assert "error" not in fake, fake.get("traceback")
    assert "error" not in real, real.get("traceback")
    for part in ("student_params", "teacher_params", "student_grads", "optimizer_states"):
        assert fake["measured_bytes"][part] == real["measured_bytes"][part] > 0, part
    a_fake, a_real = fake["measured_bytes"]["activations"], real["measured_bytes"]["activations"]
    print(f"\ntiny: fake {fake['measured_bytes']} real {real['measured_bytes']}")
    assert abs(a_fake / a_real - 1) <= 0.10, (a_fake, a_real)
    assert fake["static_bytes"] == real["static_bytes"]
    # ... and those are the plan's (fp32 weights: Adam's two moments, no master copy; the optimizer's scalar
    # step counters on top)
    from zeda_megatron.plan.memory import memory_plan

    planned = memory_plan(spec)["per_gpu_bytes"]
    for part in ("student_params", "teacher_params", "student_grads"):
        assert real["measured_bytes"][part] == planned[part], part
    assert 0 <= real["measured_bytes"]["optimizer_states"] - planned["optimizer_states"] < 0.01 * planned[
        "optimizer_states"]


def test_assumed_dispatch_splits_spread_rows_evenly():
    from zeda_megatron.assumptions import Assumption, assuming, current, even_split

    assert even_split(10, 4) == [3, 3, 2, 2] and sum(even_split(65536 * 4, 8)) == 65536 * 4
    assert Assumption().real_rows(100, 4) == 400 and Assumption(null_share=0.5).real_rows(100, 4) == 200
    assert current() is None
    with assuming(Assumption(null_share=0.25)) as a:
        assert current() is a
    assert current() is None  # the normal path reads the tensors


def test_pipeline_stages_are_rehearsed_as_rank_roles_of_their_own():
    from zeda_megatron.rehearse import rank_roles, rehearse

    spec = spec_of("model=tiny_qwen3", "parallel=pp2", "stage=sft")
    assert rank_roles(spec) == [0, 1]  # the first and the last pipeline stage
    report = rehearse(spec)
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and not report["failures"]
    first, last = report["ranks"]
    assert first["measured_bytes"]["loss_logits"] == 0 < last["measured_bytes"]["loss_logits"]
    for row in report["ranks"]:  # each compared with its own stage's plan
        for part in ("student_params", "teacher_params", "student_grads", "optimizer_states"):
            assert abs(row["measured_bytes"][part] / row["planned_bytes"][part] - 1) < 0.01, (row["rank"], part)


# ---- (e) the Slurm job's rehearse phase: both stages as the job launches them ----------------------------
def run_phase(out, world, sft, opd, timeout=900):
    cmd = [sys.executable, "-m", "zeda_megatron.pipeline", "rehearse", "--out", str(out), "--world", str(world),
           "--gpu", "h100", "--", *sft, "--", *opd]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def test_the_jobs_rehearse_phase_passes_a_job_that_fits(tmp_path):
    out = tmp_path / "rehearsal.json"
    r = run_phase(out, 1, ["model=tiny_qwen3", "parallel=single", "stage=sft"],
                  ["model=tiny_qwen3", "parallel=single", "stage=opd"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[rehearse] stage 1 (sft)" in r.stdout and "[rehearse] stage 2 (opd)" in r.stdout
    report = json.loads(out.read_text())
    assert report["fits"] is True and set(report["stages"]) == {"sft", "opd"}
    assert report["stages"]["opd"]["ranks"][0]["measured_bytes"]["rollout_kv_cache"] > 0


def test_the_jobs_rehearse_phase_refuses_a_bad_stage_config_before_building(tmp_path):
    out = tmp_path / "rehearsal.json"
    r = run_phase(out, 8, ["model=glm47_flash", *REFERENCE, "stage=sft"],
                  ["model=glm47_flash", *REFERENCE, "stage=opd", "parallel.ep=3"], timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stage 2 (opd): parallel.ep=3" in r.stdout and "[rehearse] stage 1 (sft):" not in r.stdout
    assert not out.exists()


@pytest.mark.slow
def test_a_layout_that_does_not_fit_is_reported_by_plan_and_rehearsal_and_stops_the_job(tmp_path):
    """Stage 1 without recompute and without the optimizer offload: the plan says it does not fit, and so
    does the job's rehearse phase, naming the stage, the rank and the part, before stage 2 is rehearsed."""
    from zeda_megatron.plan.fixes import plan_with_fixes

    sft = ["model=glm47_flash", *REFERENCE, "stage=sft", "trainer.recompute=false", "optim.optimizer_cpu_offload=false"]
    spec = spec_of(*sft)
    assert plan_with_fixes(spec)["fits"] is False
    out = tmp_path / "rehearsal.json"
    r = run_phase(out, 8, sft, ["model=glm47_flash", *REFERENCE, "stage=opd"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[rehearse] stage 1 (sft): rank 0: does not fit" in r.stdout
    assert "largest part:" in r.stdout and "[rehearse] stage 2 (opd):" not in r.stdout  # stage 2 not rehearsed
    report = json.loads(out.read_text())
    assert report["fits"] is False and list(report["stages"]) == ["sft"]
    sft_report = report["stages"]["sft"]
    assert sft_report["fits"] is False and sft_report["plan_fits"] is False
    assert sft_report["failures"][0].startswith("rank 0: does not fit")
    row = sft_report["ranks"][0]
    assert row["measured_peak"] + row["reserve"] > spec.layout.gpu_memory_bytes
