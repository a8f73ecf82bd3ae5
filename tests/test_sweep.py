"""Sweeps on hydra-submitit-launcher: a two-point local sweep (submitit's local executor) gives two runs in
one sweep folder and one W&B group; `python -m zeda_megatron.compare` prints both and draws the frontier."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "zeda_megatron.train", "-m", "+sweep=local", "sweep.name=ratios", "model=tiny_glm",
           "model.null_experts.ratio=0.25,0.5", "trainer.max_steps=3", "trainer.seq_length=32",
           "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "logging.wandb.mode=offline"]
    proc = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": os.path.join(str(work), "runs", "sweeps", "ratios"), "out": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_local_sweep_two_runs_one_group_one_folder(sweep):
    d = sweep["dir"]
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


@pytest.mark.slow
def test_compare_prints_both_points_and_writes_the_frontier_png(sweep, tmp_path):
    png = str(tmp_path / "frontier.png")
    csv_out = str(tmp_path / "table.csv")
    proc = subprocess.run([sys.executable, "-m", "zeda_megatron.compare", sweep["dir"], "--png", png],
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
    proc = subprocess.run([sys.executable, "-m", "zeda_megatron.compare", sweep["dir"], "--format", "csv", "--out", csv_out,
                           "--png", png], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(csv_out) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("run,null_ratio,w,null_share,expert_flops_removed,kl,nll") and len(lines) == 3
