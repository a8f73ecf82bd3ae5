"""`sbatch --nodes=2 slurm/adapt_glm.sh` on a real two-node Slurm made on this machine (tests/slurm_cluster.py:
two network namespaces with their own hostnames and addresses on a bridge the test made, one slurmd in each,
slurmctld and munged beside them).

One two-node job, CPU-sized (the small GLM-shaped test teacher; 2 ranks per node, EP=2 within a node and
data parallel across the nodes), runs every phase to an evaluated export: the environment check on both
nodes, then one torchrun per node (c10d rendezvous on the first node) for each distributed phase. It gets
the pre-time-limit signal in stage 1 (`scancel --batch --signal=USR1`, what `#SBATCH --signal=B:USR1@N`
sends), requeues itself and resumes on both nodes. A second job runs the same stages on one node with 4
ranks (from the first job's converted checkpoint and stage-1 responses): every step's loss is equal.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from slurm_cluster import GLM, cpu_overrides, job_log, losses, signal_when
from slurm_cluster import slurm2 as cluster  # noqa: F401 (fixture)
from slurm_cluster import slurm_inputs as inputs  # noqa: F401 (fixture)
from zeda_megatron.pipeline.state import read_json

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.slow]

SFT_STEPS = 12   # the signal is sent after step 2: it lands mid stage 1
PHASES = ("convert", "generate", "prepare", "sft", "opd", "export", "evaluate")


@pytest.fixture(scope="module")
def two_nodes(cluster, inputs, tmp_path_factory):
    """The two-node job, signalled in stage 1."""
    work = str(tmp_path_factory.mktemp("two_nodes"))
    run = os.path.join(work, "runs", "two")
    job_id = cluster.sbatch(GLM, work, cpu_overrides(inputs, run, SFT_STEPS, nproc=2, opd_batch=8), "--nodes=2", "--ntasks-per-node=1")
    sent_at = signal_when(cluster, job_id, os.path.join(run, "sft", "metrics.jsonl"), 2, "--batch", "--signal=USR1")
    info = cluster.wait_done(job_id, timeout=1500)
    return {"id": job_id, "info": info, "run": run, "sent_at": sent_at, "log": job_log(work, job_id)}


@pytest.fixture(scope="module")
def one_node(cluster, inputs, two_nodes, tmp_path_factory):
    """The same stages on one node with 4 ranks."""
    assert two_nodes["info"]["JobState"] == "COMPLETED", two_nodes["log"][-3000:] + cluster.logs()
    work = str(tmp_path_factory.mktemp("one_node"))
    run = os.path.join(work, "runs", "one")
    os.makedirs(os.path.join(run, "job"))
    shutil.copytree(os.path.join(two_nodes["run"], "convert"), os.path.join(run, "convert"))
    shutil.copy2(os.path.join(two_nodes["run"], "job", "convert.done"), os.path.join(run, "job", "convert.done"))
    ov = cpu_overrides(inputs, run, SFT_STEPS, nproc=4, opd_batch=8) + [
        f"data.responses={os.path.join(two_nodes['run'], 'data', 'stage1.jsonl')}", "job.phases=convert,generate,prepare,sft,opd"]
    job_id = cluster.sbatch(GLM, work, ov, "--nodes=1", "--ntasks-per-node=1")
    info = cluster.wait_done(job_id, timeout=900)
    return {"id": job_id, "info": info, "run": run, "log": job_log(work, job_id)}


def _slurmd_log(cluster, node: str) -> str:
    with open(cluster.path("log", f"slurmd-{node}.log"), errors="replace") as f:
        return f.read()


def test_two_nodes_run_every_phase_to_an_evaluated_export(cluster, two_nodes):
    info, run, log = two_nodes["info"], two_nodes["run"], two_nodes["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:] + cluster.logs()
    assert info["NodeList"] == "zn[1-2]" and info["NumNodes"] == "2", info
    assert "all phases complete" in log
    assert "[zeda] plan: embedded_glm (glm), 2 node(s) x 2 processes" in log
    for i, name in enumerate(PHASES, start=1):
        assert read_json(os.path.join(run, "job", f"{name}.status.json"))["state"] == "complete", name
        assert f"phase {i} {name}: done in" in log
    # the environment check ran on each node (its own hostname), and so did each phase's srun step
    with open(os.path.join(run, "logs", "0-check.log")) as f:
        check = f.read()
    assert re.search(r"^\[check\] zn1: python", check, re.M) and re.search(r"^\[check\] zn2: python", check, re.M), check
    for node in ("zn1", "zn2"):
        steps = set(re.findall(rf"launch task StepId={two_nodes['id']}\.(\d+) ", _slurmd_log(cluster, node)))
        assert len(steps) >= 4, (node, steps)   # env, convert, generate, sft, opd (and again after the requeue)
    # stage 1 and 2: 4 ranks, EP=2 within a node, data parallel across the two nodes
    for stage in ("sft", "opd"):
        with open(os.path.join(run, "logs", f"{4 if stage == 'sft' else 5}-{stage}.log")) as f:
            text = f.read()
        assert re.search(r"layout: TP1 PP1 EP2 ETP1 DP4, \d+ micro-batches/step; 4 processes", text), text[:2000]
    # an evaluated export with null experts
    with open(os.path.join(run, "hf", "config.json")) as f:
        assert "PlusPlus" in json.load(f)["architectures"][0]
    e = read_json(os.path.join(run, "eval", "eval.json"))
    assert 0.0 < e["expert_flops_removed"] < 1.0 and e["student_nll"] > 0


def test_usr1_requeues_the_job_and_it_resumes_on_both_nodes(cluster, two_nodes):
    info, run, log = two_nodes["info"], two_nodes["run"], two_nodes["log"]
    assert two_nodes["sent_at"] is not None, log[-3000:]
    assert info["JobState"] == "COMPLETED", log[-4000:] + cluster.logs()
    assert int(info["Restarts"]) >= 1, info
    assert "SIGUSR1 (time limit near)" in log and "requeueing job" in log
    rows = cluster.runs_of(two_nodes["id"])
    assert len(rows) >= 2 and all("NodeList=zn[1-2]" in r for r in rows) and "JobState=COMPLETED" in rows[-1], rows
    with open(os.path.join(run, "logs", "4-sft.log")) as f:
        sft_log = f.read()
    m = re.search(rf"resuming: (\d+)/{SFT_STEPS} steps already done", sft_log)
    assert m and 2 <= int(m.group(1)) < SFT_STEPS, sft_log[-3000:]
    # the requeued run checked both nodes again and finished stage 1 on both
    with open(os.path.join(run, "logs", "0-check.log")) as f:
        check = f.read()
    assert len(re.findall(r"^\[check\] zn2: python", check, re.M)) >= 2, check
    assert read_json(os.path.join(run, "sft", "status.json"))["step"] == SFT_STEPS


def test_losses_equal_one_node_with_four_ranks(two_nodes, one_node):
    assert one_node["info"]["JobState"] == "COMPLETED", one_node["log"][-4000:]
    assert "phase 1 convert: complete already, skipped" in one_node["log"]
    assert "[zeda] plan: embedded_glm (glm), 1 node(s) x 4 processes" in one_node["log"]
    for stage, steps in (("sft", SFT_STEPS), ("opd", 2)):
        two, one = losses(two_nodes["run"], stage), losses(one_node["run"], stage)
        assert [s for s, _ in two] == list(range(1, steps + 1)) == [s for s, _ in one], (stage, two, one)
        assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-6, abs=1e-7), (stage, two, one)
