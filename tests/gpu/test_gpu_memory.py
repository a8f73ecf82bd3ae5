"""GPU smoke (marker ``gpu``): a mid-size stage-1 step of each released model — two full-width layers
(hidden 2048, all 128 / 64 experts, the real vocabulary) at the reference micro-batch (2 x 32,768 tokens,
full recompute, the fused KL, the distributed optimizer offloaded to the CPU) on one GPU. Its
torch.cuda.max_memory_allocated is compared with the memory plan of the same overrides and with the
rehearsal (``python -m zeda_megatron.rehearse``, a CPU subprocess started alongside); both ratios go to the
report. The plan's peak includes a reserve for what the allocator does not count (CUDA context, NCCL,
fragmentation): the measured peak is compared with the plan without it, and must not exceed the plan's
peak with it (the plan would then call a layout fitting that does not)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import smoke_runs as S

pytestmark = pytest.mark.gpu

MID = ["model.hf_dir=null", "model.chat_template=false", "model.hf_config.num_hidden_layers=2", "stage=sft",
       "trainer.micro_batch_size=2", "trainer.seq_length=32768", "trainer.global_batch_size=2", "trainer.max_steps=1",
       "trainer.recompute=full", "stage.fused_loss=true", "optim.use_distributed_optimizer=true",
       "optim.optimizer_cpu_offload=true", "optim.optimizer_offload_fraction=1.0", "data.synthetic_samples=4096",
       "logging.progress=false"]


def mid_overrides(model: str) -> list[str]:
    overrides = [f"model={model}", *MID]
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not HAVE_TE:  # the presets' fused kernels are Transformer Engine's: the local spec runs without them
        overrides += ["model.mcore.moe_grouped_gemm=false", "model.mcore.moe_permute_fusion=false",
                      "model.mcore.gradient_accumulation_fusion=false"]
    return overrides


def start_rehearsal(overrides: list[str], out_path: str):
    """The rehearsal of the same overrides on the CPU, or None when this tree has no zeda_megatron.rehearse."""
    if importlib.util.find_spec("zeda_megatron.rehearse") is None:
        return None
    log = open(out_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "zeda_megatron.rehearse", *overrides, "parallel.gpus=1"],
                            cwd=S.ROOT, env=S.env(cpu=True, threads=4), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def rehearsal_peak(proc, out_path: str, timeout: float) -> tuple[int | None, str]:
    """(rank 0's measured peak, status) from the rehearsal's last JSON line."""
    if proc is None:
        return None, "not available (no zeda_megatron.rehearse in this tree)"
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, f"not available (did not finish within {timeout:.0f} s)"
    proc.log.close()
    with open(out_path) as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"not available (exit {proc.returncode}; see {out_path})"
    ranks = json.loads(lines[-1])["ranks"]
    rank0 = next((r for r in ranks if r.get("rank") == 0), ranks[0])
    return int(rank0["measured_peak"]), "ok"


def plan_of(overrides: list[str]) -> dict:
    from zeda_megatron import plan as P
    from zeda_megatron.spec import compose, resolve

    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    return P.plan_with_fixes(resolve(compose(overrides, run_dir="."), 1, inputs=False, on_gpu=True, gpu_gb=gpu_gb))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("model", ("qwen3_30b_a3b", "glm47_flash"))
def test_mid_size_step_memory_against_plan_and_rehearsal(model, tmp_path, figures):
    overrides = mid_overrides(model)
    plan = plan_of(overrides)
    rehearsal = start_rehearsal(overrides, str(tmp_path / "rehearse.log"))
    memory = tmp_path / "memory.json"
    rows = S.train(tmp_path / "run", *overrides, memory=str(memory), common=False, save=False, timeout=400)
    measured = json.loads(memory.read_text())
    peak = measured["max_memory_allocated"]
    reserve = plan["per_gpu_bytes"]["reserve"]
    planned = plan["gpu_bytes"] - reserve
    r_peak, r_status = rehearsal_peak(rehearsal, str(tmp_path / "rehearse.log"), timeout=120)
    figures.update(
        measured_max_allocated=peak, measured_max_reserved=measured["max_memory_reserved"],
        planned_peak_without_reserve=planned, planned_peak=plan["gpu_bytes"], planned_parts=plan["per_gpu_bytes"],
        ratio_to_plan=peak / planned, rehearsal_measured_peak=r_peak,
        ratio_to_rehearsal=(peak / r_peak) if r_peak else r_status, loss=rows[-1]["loss"],
        null_share=rows[-1]["null_share"], step_time_s=rows[-1]["step_time_s"],
    )
    gib = 1024**3
    print(f"{model} mid-size step: GPU max allocated {peak / gib:.2f} GiB; plan {planned / gib:.2f} GiB without the "
          f"reserve (ratio {peak / planned:.3f}), {plan['gpu_bytes'] / gib:.2f} GiB with it; rehearsal "
          + (f"{r_peak / gib:.2f} GiB (ratio {peak / r_peak:.3f})" if r_peak else r_status))
    assert rows[-1]["step"] == 1 and rows[-1]["loss"] == rows[-1]["loss"]
    assert peak <= plan["gpu_bytes"], f"the step allocated {peak / gib:.2f} GiB, above the plan's peak"
