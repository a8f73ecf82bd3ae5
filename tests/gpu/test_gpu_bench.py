"""GPU smoke (marker ``gpu``): tools/bench_moe_layer.py (null-expert layer vs the stock MoELayer; EP=2 on
two GPUs) and tools/bench_rollout.py (KV-cached vs recomputed sampling) on the GPU; their tables go to
the log and their JSON figures to the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import smoke_runs as S

pytestmark = pytest.mark.gpu


def _run(cmd, timeout=300) -> dict:
    res = subprocess.run(cmd, cwd=S.ROOT, env=S.env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    print(res.stdout)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert lines, res.stdout[-3000:]
    return json.loads(lines[-1])


@pytest.mark.timeout(120)
def test_bench_moe_layer(figures):
    cmd = [sys.executable, "tools/bench_moe_layer.py", "--iters", "5", "--warmup", "2", "--tokens", "8192"]
    if torch.cuda.device_count() >= 2:
        from zeda_megatron.distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "tools/bench_moe_layer.py", "--ep", "2", "--iters", "5", "--warmup", "2",
               "--tokens", "8192"]
    fig = _run(cmd)
    figures.update(fig)
    assert [round(p["target_null_share"], 2) for p in fig["points"]] == [0.0, 0.25, 0.5, 0.75]
    # fewer rows leave for the experts as the null share grows (what the benchmark times)
    rows = [p["rows_sent"] for p in fig["points"]]
    assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0], rows


@pytest.mark.timeout(120)
def test_bench_rollout(figures):
    fig = _run([sys.executable, "tools/bench_rollout.py", "--prompts", "256", "--slots", "16", "--limit", "128"])
    figures.update(fig)
    # the schedule does not depend on the device (lengths are imposed): refilled slots stay busy, the
    # static batches do not, and the sampler syncs the host at most once per step
    assert fig["refill_slot_utilisation"] >= 0.8 > fig["static_slot_utilisation"], fig
    assert fig["host_syncs_per_step"] <= 1.0 and fig["refill_tokens_per_s"] > 0, fig
