"""CI (CPU): the GPU smoke tests are collected and, without CUDA, skipped with the reason; the smoke
script exits with a clear message (status 3) where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def test_gpu_tests_are_collected_and_skipped_with_the_reason():
    res = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rs", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    for name in ("test_te_spec_builds_and_matches_transformers", "test_grouped_gemm_equals_sequential_experts",
                 "test_bf16_stage1_then_stage2", "test_two_gpus_nccl", "test_distributed_optimizer_and_cpu_offload",
                 "test_save_resume_matches_uninterrupted", "test_export_and_hf_reload", "test_bench_moe_layer"):
        assert name in out or torch.cuda.is_available(), (name, out[-3000:])
    if not torch.cuda.is_available():
        assert "passed" not in out.splitlines()[-1]
        assert "skipped" in out.splitlines()[-1]
        assert "needs CUDA (no GPU here); run tools/gpu_smoke.sh on a GPU node" in out


def test_gpu_tests_collected_by_name():
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/gpu",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    assert len(ids) == 13, res.stdout  # 2 TE builds, 2 grouped GEMM, plan, 2 stage pairs, 2 NCCL, distopt, resume, export, bench
    assert all(line.startswith("tests/gpu/test_gpu_") for line in ids)


def test_smoke_script_on_cpu_exits_with_the_message():
    res = subprocess.run(["bash", "tools/gpu_smoke.sh"], cwd=ROOT, env={**ENV, "ZEDA_FORCE_CPU": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3
    assert "gpu_smoke: no CUDA GPU available" in res.stderr and "nothing was run" in res.stderr
