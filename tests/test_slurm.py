"""The user's job on a real Slurm: `sbatch slurm/adapt_glm.sh` from a Hugging Face checkpoint to an
evaluated export, and a requeue that works.

The `slurm` tests start a one-node cluster for this machine (tests/slurm_cluster.py: Debian's slurm-wlm +
munge, installed when missing; munged, slurmctld, slurmd in the foreground in a temporary folder; exactly
the processes it started are stopped). On it the real slurm/adapt_glm.sh runs with CPU-sized overrides (no
GPU; the small GLM-shaped test teacher; 2 ranks, EP=2): every phase to an evaluated export; then a second
submission gets the pre-time-limit signal in stage 1 (`scancel --batch --signal=USR1`, what
`#SBATCH --signal=B:USR1@N` sends), requeues itself and finishes with the same losses as the uninterrupted
run. The other tests (inputs missing, DRY_RUN) run the script directly, without Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from slurm_cluster import GLM, QWEN, cpu_overrides, job_log, signal_when, slurm, summary  # noqa: F401 (fixture)
from slurm_cluster import slurm_inputs as inputs  # noqa: F401 (fixture)
from zeda_megatron.pipeline.state import read_json

SFT_STEPS = 30  # enough that the signal (sent at step 2) lands mid stage 1 on a fast machine too
PHASES = ("convert", "generate", "prepare", "sft", "opd", "export", "evaluate")


@pytest.fixture(scope="module")
def full_job(slurm, inputs, tmp_path_factory):
    """One uninterrupted `sbatch slurm/adapt_glm.sh ...` to an evaluated export."""
    work = str(tmp_path_factory.mktemp("job_a"))
    run = os.path.join(work, "runs", "a")
    job_id = slurm.sbatch(GLM, work, cpu_overrides(inputs, run, SFT_STEPS))
    info = slurm.wait_done(job_id, timeout=900)
    return {"id": job_id, "info": info, "run": run, "work": work, "log": job_log(work, job_id)}


# ---- the tests ---------------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_runs_every_phase_to_an_evaluated_export(full_job, slurm):
    info, run, log = full_job["info"], full_job["run"], full_job["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:] + slurm.logs()
    assert "all phases complete" in log
    # every phase's output
    assert os.path.isfile(os.path.join(run, "convert", "zeda_bridge.json"))
    with open(os.path.join(run, "data", "stage1.jsonl")) as f:
        assert sum(1 for line in f if line.strip()) == 48
    for stage, steps in (("sft", SFT_STEPS), ("opd", 2)):
        assert summary(run, stage)["steps_done"] == steps
    with open(os.path.join(run, "hf", "config.json")) as f:
        assert "PlusPlus" in json.load(f)["architectures"][0]  # null experts exported
    ev = os.path.join(run, "eval", "eval.json") if os.path.isfile(os.path.join(run, "eval", "eval.json")) \
        else os.path.join(run, "eval", "summary.json")
    with open(ev) as f:
        e = json.load(f)
    assert 0.0 < e["expert_flops_removed"] < 1.0 and e["student_nll"] > 0
    # per-phase logs: what it will do first, what it did last; a marker per completed phase
    for i, name in enumerate(PHASES, start=1):
        with open(os.path.join(run, "logs", f"{i}-{name}.log")) as f:
            text = f.read()
        assert text.startswith(f"==== phase {i} {name}:"), text[:300]
        assert f"==== {name} done in" in text.strip().splitlines()[-1], text[-500:]
        assert os.path.isfile(os.path.join(run, "job", f"{name}.done"))
        assert f"phase {i} {name}: done in" in log
    # how each phase ended, from the status files (the trainer's own, and the runner's per phase)
    for name in PHASES:
        assert read_json(os.path.join(run, "job", f"{name}.status.json"))["state"] == "complete", name
    assert read_json(os.path.join(run, "sft", "status.json"))["state"] == "complete"
    assert read_json(os.path.join(run, "sft", "status.json"))["step"] == SFT_STEPS
    # known-harmless warnings are filtered at their source
    with open(os.path.join(run, "logs", "4-sft.log")) as f:
        text = f.read()
    assert "Apex is not installed" not in text and "GPTModel IS DEPRECATED" not in text
    assert re.search(rf"step {SFT_STEPS}/{SFT_STEPS} .*eta", text)


@pytest.mark.slurm
@pytest.mark.slow
def test_pre_time_limit_signal_requeues_and_resumes_every_phase(full_job, slurm, inputs, tmp_path_factory):
    """The second submission starts from the first one's converted checkpoint and stage-1 responses
    (those phases are skipped), is signalled in stage 1, requeues and finishes with the same losses."""
    assert full_job["info"]["JobState"] == "COMPLETED", full_job["log"][-3000:]
    work = str(tmp_path_factory.mktemp("job_b"))
    run = os.path.join(work, "runs", "b")
    os.makedirs(os.path.join(run, "job"))
    shutil.copytree(os.path.join(full_job["run"], "convert"), os.path.join(run, "convert"))
    shutil.copy2(os.path.join(full_job["run"], "job", "convert.done"), os.path.join(run, "job", "convert.done"))
    ov = cpu_overrides(inputs, run, SFT_STEPS) + [f"data.responses={os.path.join(full_job['run'], 'data', 'stage1.jsonl')}"]
    job_id = slurm.sbatch(GLM, work, ov)
    # what #SBATCH --signal=B:USR1@N does: SIGUSR1 to the batch shell
    sent_at = signal_when(slurm, job_id, os.path.join(run, "sft", "metrics.jsonl"), 2, "--batch", "--signal=USR1")
    assert sent_at is not None, job_log(work, job_id)[-3000:]
    info = slurm.wait_done(job_id, timeout=900)
    log = job_log(work, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:] + slurm.logs()
    assert int(info["Restarts"]) >= 1, info
    assert "SIGUSR1 (time limit near)" in log and "requeueing job" in log
    # the verdict came from the trainer's status file (stopped on the signal short of its last step)
    assert re.search(rf"phase 4 sft stopped on SIGUSR1 at step \d+/{SFT_STEPS}: .*requeue \(restart 1\)", log), log[-3000:]
    with open(os.path.join(run, "logs", "4-sft.log")) as f:
        sft_log = f.read()
    m = re.search(rf"resuming: (\d+)/{SFT_STEPS} steps already done", sft_log)
    assert m and 2 <= int(m.group(1)) < SFT_STEPS, sft_log[-3000:]  # stopped mid stage 1, resumed from its checkpoint
    assert "phase 1 convert: complete already, skipped" in log
    # every phase finished; same final losses as the uninterrupted run
    for stage in ("sft", "opd"):
        a, b = summary(full_job["run"], stage)["last"], summary(run, stage)["last"]
        assert b["step"] == a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), (stage, a, b)
    assert os.path.isfile(os.path.join(run, "hf", "config.json"))
    assert os.path.isdir(os.path.join(run, "eval"))
    # Slurm's own record: the job ran twice (jobcomp: one line per run)
    rows = slurm.runs_of(job_id)
    assert len(rows) >= 2 and "JobState=COMPLETED" in rows[-1], rows


# ---- without Slurm -----------------------------------------------------------------------------------------
def _run_script(script, *args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(["bash", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_missing_inputs_fail_in_the_check_phase_naming_the_override(tmp_path):
    teacher, prompts = tmp_path / "teacher", tmp_path / "prompts.jsonl"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    prompts.write_text('{"prompt": "1 + 1 ="}\n')
    inputs = {"teacher": str(teacher), "prompts": str(prompts)}
    r = _run_script(GLM, f"data.prompts={inputs['prompts']}", "job.device=cpu", cwd=str(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "phase 'check' failed" in r.stderr and "model.hf_dir is not set" in r.stderr, r.stderr
    r = _run_script(QWEN, f"model.hf_dir={inputs['teacher']}", "job.device=cpu", cwd=str(tmp_path))
    assert r.returncode == 2 and "data.prompts is not set" in r.stderr, r.stderr
    r = _run_script(GLM, f"model.hf_dir={tmp_path}/nope", f"data.prompts={tmp_path}/none.jsonl", "job.device=cpu",
                    cwd=str(tmp_path))
    assert r.returncode == 2 and "model.hf_dir=" in r.stderr and "has no config.json" in r.stderr, r.stderr
    assert "data.prompts=" in r.stderr and "does not exist" in r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs", "zeda-glm-local", "convert"))  # nothing started


def _dry(script) -> str:
    r = _run_script(script, env_extra={"DRY_RUN": "1"}, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("script,lr2", [(GLM, "1e-06"), (QWEN, "5e-06")])
def test_dry_run_prints_the_reference_hyper_parameters(script, lr2):
    """docs/method.md sections 4-5: stage 1 one epoch of 60k prompts at GBS 128 (469 steps), lr 2e-5
    cosine with 10% warmup, wd 0.1, betas 0.9/0.98, 65,536 tokens per micro-batch; stage 2 321 steps of
    16 prompts x 2 samples (GBS 32), constant lr (GLM 1e-6, Qwen 5e-6), responses up to 32,768 tokens at
    temperature 1; the reference layout TP4 EP8 on one 8-GPU node."""
    out = _dry(script)
    assert "1 node(s) x 8 processes" in out
    assert "stage 1 (sft): 469 steps, global batch 128, micro batch 1, seq length 65536 (1 epoch of 60000 examples)" in out
    assert "stage 2 (opd): 321 steps, global batch 32 (16 prompts x 2 samples), micro batch 2, seq length 36864, " \
           "response <= 32768 tokens, temperature 1.0" in out
    opt = re.findall(r"optimizer: (.*)", out)
    assert opt[0] == "lr 2e-05 (cosine, warmup 0.1, min 0.0), wd 0.1, betas 0.9/0.98", opt
    assert opt[1] == f"lr {lr2} (constant, warmup 0.0, min {lr2}), wd 0.1, betas 0.9/0.98", opt
    assert out.count("layout: TP4 PP1 EP8") == 2
    # the commands carry the same values
    assert re.search(r"zeda_megatron\.train stage=sft .*trainer\.max_steps=469 trainer\.global_batch_size=128", out)
    assert re.search(r"zeda_megatron\.train stage=opd .*trainer\.max_steps=321 trainer\.global_batch_size=32 .*"
                     r"stage\.samples_per_prompt=2 stage\.max_new_tokens=32768 stage\.temperature=1\.0", out)
    assert re.search(r"parallel=reference_8gpu", out)
    for phase in ("check", "rehearse", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate"):
        assert re.search(rf"\d\. {phase}\s", out), phase
    # the time plan of every phase on the default GPU, and the job runs at the sbatch script's --time
    assert "time plan on NVIDIA H100" in out
    hours = {m[0]: float(m[1]) for m in re.findall(r"\| (\w+) \| ([\d.]+) \|", out)}
    assert set(hours) == {"check", "rehearse", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate"}, hours
    assert re.search(r"at --time 24 h per job run: \d+ runs, \d+ requeues", out)
    # the rehearsal of both stages, as launched, before any GPU work (one process on the first node)
    assert re.search(r" 1\. rehearse ", out)
    assert re.search(r"zeda_megatron\.pipeline rehearse --out \S+/job/rehearsal\.json "
                     r"--world 8 --gpu h100 -- stage=sft .*trainer\.seq_length=65536 .* -- stage=opd .*"
                     r"trainer\.seq_length=36864", out)


def test_dry_run_follows_overrides():
    r = _run_script(GLM, "sft.trainer.global_batch_size=256", "opd.optim.lr=2e-6", "job.nproc_per_node=4",
                    env_extra={"DRY_RUN": "1"}, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert "stage 1 (sft): 235 steps, global batch 256" in r.stdout  # ceil(60000 / 256)
    assert re.findall(r"optimizer: lr ([^ ]+)", r.stdout)[1] == "2e-06"
    assert "1 node(s) x 4 processes" in r.stdout


def test_dry_run_time_plan_follows_the_gpu_and_the_time_limit():
    r = _run_script(QWEN, "job.gpu=h200", "job.time_limit=2-00:00:00", env_extra={"DRY_RUN": "1"}, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert "time plan on NVIDIA H200" in r.stdout and re.search(r"at --time 48 h per job run: \d+ runs", r.stdout)
    from zeda_megatron.pipeline.adapt import build_plan

    plan = build_plan("qwen", "/tmp/zeda-gpu-check", ["job.gpu=b300"], dry_run=True, env={})
    assert any(e.startswith("job.gpu=b300: unknown GPU") for e in plan["errors"]), plan["errors"]
