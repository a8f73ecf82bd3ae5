"""Sweeps on hydra-submitit-launcher: a two-point sweep gives two runs in one sweep folder and one W&B group;
`python -m zeda_megatron.compare` prints both and draws the frontier.

* ``+sweep=local`` (submitit's local executor, one process per point);
* ``+sweep=slurm`` on a real one-node Slurm (tests/slurm_cluster.py): one job per point, and the point with
  ratio 0.5 gets submitit's pre-time-limit signal mid-run (``scancel --signal=USR2``, what the
  ``--signal=USR2@N`` submitit asks for sends to the job's tasks): it saves, requeues itself and resumes,
  and every step's loss equals the uninterrupted local sweep's same point.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from slurm_cluster import losses, signal_when, slurm  # noqa: F401 (fixture)
from zeda_megatron.pipeline.state import read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60   # ~0.1 s each: the signal, sent after step 2, lands mid-run
# the same points on both launchers (the Slurm sweep's losses are compared with the local sweep's)
POINTS = ["model=tiny_glm", "model.null_experts.ratio=0.25,0.5", f"trainer.max_steps={STEPS}", "trainer.seq_length=32",
          "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "logging.wandb.mode=offline"]
# one CPU task per point on a machine without GPUs: no GPU request, one rank each
CPU_SLURM = ["cluster.gpus_per_node=1", "cluster.cpus_per_task=1", "hydra.launcher.gpus_per_node=null"]
ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "zeda_megatron.train", "-m", "+sweep=local", "sweep.name=ratios", *POINTS]
    proc = subprocess.run(cmd, cwd=str(work), env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": os.path.join(str(work), "runs", "sweeps", "ratios"), "out": proc.stdout + proc.stderr}


def _array_task(slurm, index: int, timeout: float = 300) -> str | None:
    """The Slurm id (``<array job>_<index>``) of one sweep point, once it is queued."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        ids = slurm.run("squeue", "-h", "-o", "%i", check=False).split()
        hit = [i for i in ids if i.endswith(f"_{index}")]
        if hit:
            return hit[0]
        time.sleep(0.2)
    return None


@pytest.fixture(scope="module")
def slurm_sweep(slurm, tmp_path_factory):
    """Both points on Slurm; point 1 signalled after its second step."""
    work = str(tmp_path_factory.mktemp("slurm_sweep"))
    d = os.path.join(work, "runs", "sweeps", "ratios")
    cmd = [sys.executable, "-m", "zeda_megatron.train", "-m", "+sweep=slurm", "sweep.name=ratios", *POINTS, *CPU_SLURM]
    with open(os.path.join(work, "launcher.out"), "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env={**slurm.env, **ENV}, stdout=out, stderr=subprocess.STDOUT)
        try:
            job = _array_task(slurm, 1)
            sent_at = signal_when(slurm, job, os.path.join(d, "1", "metrics.jsonl"), 2, "--signal=USR2") if job else None
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(os.path.join(work, "launcher.out"), errors="replace") as f:
        text = f.read()
    # the launcher has the point's result once it is written: Slurm may still be completing the job
    info = slurm.wait_done(job, timeout=120) if job else {}
    return {"dir": d, "job": job, "sent_at": sent_at, "rc": rc, "out": text, "info": info}


def _assert_two_runs_one_group_one_folder(d):
    runs = sorted(p for p in os.listdir(d) if p.isdigit())
    assert runs == ["0", "1"], os.listdir(d)
    ratios, groups = [], set()
    for r in runs:
        with open(os.path.join(d, r, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        ratios.append(cfg["model"]["null_experts"]["ratio"])
        groups.add(cfg["logging"]["wandb"]["group"])
        assert os.path.isfile(os.path.join(d, r, "summary.json"))
        # the W&B run (offline here) of each point lives in the point's folder
        assert glob.glob(os.path.join(d, r, "wandb", "offline-run-*")), os.listdir(os.path.join(d, r))
    assert ratios == [0.25, 0.5]
    assert groups == {"ratios"}
    assert os.path.isdir(os.path.join(d, ".submitit"))  # run through submitit


def _assert_compare_draws_the_frontier(d, tmp_path):
    png = str(tmp_path / "frontier.png")
    csv_out = str(tmp_path / "table.csv")
    proc = subprocess.run([sys.executable, "-m", "zeda_megatron.compare", d, "--png", png],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 2, proc.stdout
    assert rows[0].split("|")[2].strip() == "0.25" and rows[1].split("|")[2].strip() == "0.5"
    header = proc.stdout.splitlines()[0]
    for col in ("null ratio", "w", "null share", "expert FLOPs removed", "KL", "NLL", "tokens/s"):
        assert f"| {col} |" in header, header
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, "-m", "zeda_megatron.compare", d, "--format", "csv", "--out", csv_out,
                           "--png", png], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(csv_out) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("run,null_ratio,w,null_share,expert_flops_removed,kl,nll") and len(lines) == 3


@pytest.mark.slow
def test_local_sweep_two_runs_one_group_one_folder(sweep):
    _assert_two_runs_one_group_one_folder(sweep["dir"])


@pytest.mark.slow
def test_compare_prints_both_points_and_writes_the_frontier_png(sweep, tmp_path):
    _assert_compare_draws_the_frontier(sweep["dir"], tmp_path)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_two_runs_one_group_one_folder(slurm_sweep, slurm):
    assert slurm_sweep["rc"] == 0, slurm_sweep["out"][-4000:] + slurm.logs()
    _assert_two_runs_one_group_one_folder(slurm_sweep["dir"])
    for r in ("0", "1"):
        assert read_json(os.path.join(slurm_sweep["dir"], r, "status.json"))["state"] == "complete", r


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_point_signalled_mid_run_saves_requeues_and_resumes(slurm_sweep, sweep, slurm):
    assert slurm_sweep["sent_at"] is not None, slurm_sweep["out"][-3000:]
    assert slurm_sweep["rc"] == 0, slurm_sweep["out"][-4000:] + slurm.logs()
    info = slurm_sweep["info"]
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    point = os.path.join(slurm_sweep["dir"], "1")
    # it saved on the signal, short of its last step, and resumed from that checkpoint
    saved = sorted(int(m.group(1)) for m in map(re.compile(r"^iter_(\d+)$").match,
                                                 os.listdir(os.path.join(point, "checkpoints"))) if m)
    assert saved[-1] == STEPS and 2 <= saved[0] < STEPS, saved
    logs = ""
    for path in glob.glob(os.path.join(slurm_sweep["dir"], ".submitit", "*", "*_log.*")):   # the points' stdout, stderr
        with open(path, errors="replace") as f:
            logs += f.read()
    assert re.search(r"stopped on SIGUSR2 \(the time limit is near\): requeue \(restart 1\)", logs), logs[-3000:]
    assert read_json(os.path.join(point, "status.json"))["step"] == STEPS
    # every step's loss equals the uninterrupted point's (the local sweep's, same settings)
    for r in ("0", "1"):
        slurm_losses, local_losses = losses(slurm_sweep["dir"], r), losses(sweep["dir"], r)
        assert [s for s, _ in slurm_losses] == list(range(1, STEPS + 1)), slurm_losses
        assert [v for _, v in slurm_losses] == pytest.approx([v for _, v in local_losses], rel=1e-6, abs=1e-7), r


@pytest.mark.slurm
@pytest.mark.slow
def test_compare_draws_the_slurm_sweeps_frontier(slurm_sweep, tmp_path):
    assert slurm_sweep["rc"] == 0, slurm_sweep["out"][-4000:]
    _assert_compare_draws_the_frontier(slurm_sweep["dir"], tmp_path)
