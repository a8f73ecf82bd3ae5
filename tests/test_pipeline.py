"""The phase pipeline without Slurm (zeda_megatron/pipeline): fingerprints, the completion rule, how a
phase ended and the one requeue decision, the Slurm runner's verdicts, the command lines it launches, and
the bookkeeping's standard-library-only property (the batch shell runs it with the node's python3)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from zeda_megatron.pipeline import launch, slurm, state
from zeda_megatron.pipeline.overrides import settings
from zeda_megatron.pipeline.phases import Phase, assign_keys, number, train_phase
from zeda_megatron.training import signals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _phases(run: str, prep_cmd=("-c", "pass")) -> list[Phase]:
    data, stage = os.path.join(run, "data.jsonl"), os.path.join(run, "sft")
    ps = [Phase("prepare", "make data", list(prep_cmd), outputs=[data]),
          train_phase("sft", "stage 1", stage, ["stage=sft"], 4, inputs=[data], nproc=2),
          Phase("export", "export", ["-c", "pass"], inputs=[stage], outputs=[os.path.join(run, "hf")],
                atomic=os.path.join(run, "hf"))]
    return assign_keys(number(ps, run, first=1), run)


def _run_folder(tmp_path, **job) -> tuple[str, list[Phase]]:
    """A run folder as the check phase leaves it: this start's record and a plan."""
    run = str(tmp_path / "run")
    ps = _phases(run)
    js = settings("glm", [f"job.run_dir={run}", "job.device=cpu", *[f"job.{k}={v}" for k, v in job.items()]], {})
    state.write_json(slurm.checks_path(run), {"job": js, "start": 0.0, "steps": []})
    state.write_json(slurm.plan_path(run), {"job": js, "phases": [p.to_dict() for p in ps],
                                            "wanted": [p.name for p in ps]})
    return run, ps


def _trainer_ends(stage_dir: str, step: int, signal: str | None) -> None:
    os.makedirs(stage_dir, exist_ok=True)
    state.record_run_end(stage_dir, step, 4, signal)


def test_fingerprints_follow_settings_and_upstream_not_the_run_folder(tmp_path):
    a, b = _phases(str(tmp_path / "a")), _phases(str(tmp_path / "b"))
    assert [p.key for p in a] == [p.key for p in b]   # a copied run folder still matches
    c = _phases(str(tmp_path / "a"), prep_cmd=("-c", "print(1)"))
    # a changed phase reruns, and so does everything that reads what it wrote
    assert all(x.key != y.key for x, y in zip(a, c))
    d = _phases(str(tmp_path / "a"))
    d[2].cmd = ["-c", "print(2)"]
    assign_keys(d, str(tmp_path / "a"))
    assert [p.key for p in d[:2]] == [p.key for p in a[:2]] and d[2].key != a[2].key


def test_completion_rule_needs_the_fingerprint_the_outputs_and_the_trainers_status(tmp_path):
    run = str(tmp_path)
    prep, sft, _ = _phases(run)
    assert not state.is_complete(prep, run)
    open(prep.outputs[0], "w").close()
    assert not state.is_complete(prep, run)          # no marker yet
    state.mark(prep, run)
    assert state.is_complete(prep, run)
    prep2 = _phases(run, prep_cmd=("-c", "print(1)"))[0]
    assert not state.is_complete(prep2, run) and state.stale(prep2, run)
    # a training stage: its status must say it reached its last step
    _trainer_ends(sft.outputs[0], 3, "SIGUSR1")
    state.mark(sft, run)
    assert not state.is_complete(sft, run)
    _trainer_ends(sft.outputs[0], 4, None)
    assert state.is_complete(sft, run)


def test_finish_judges_by_exit_code_outputs_and_status(tmp_path):
    run = str(tmp_path)
    prep, sft, export = _phases(run)
    state.begin(prep, run)
    assert state.finish(prep, run, 0)["state"] == "failed"        # exit 0 without its output
    open(prep.outputs[0], "w").close()
    assert state.finish(prep, run, 0)["state"] == "complete"
    # torchrun reports the signal it forwarded (exit 1) after the last step: still complete
    state.begin(sft, run)
    _trainer_ends(sft.outputs[0], 4, "SIGUSR1")
    assert state.finish(sft, run, 1)["state"] == "complete"
    # stopped short of the last step on a signal the trainer recorded, exit 0
    state.begin(sft, run)
    _trainer_ends(sft.outputs[0], 2, "SIGUSR1")
    out = state.finish(sft, run, 0)
    assert (out["state"], out["signal"], out["step"]) == ("stopped", "SIGUSR1", 2)
    assert state.read_json(state.phase_status_path(run, "sft"))["state"] == "stopped"
    # the atomic output: renamed on success; exit 0 without it is a failure
    state.begin(export, run)
    assert not os.path.exists(export.atomic + ".tmp")
    assert state.finish(export, run, 0)["state"] == "failed"
    os.makedirs(export.atomic + ".tmp")
    assert state.finish(export, run, 0)["state"] == "complete" and os.path.isdir(export.atomic)


@pytest.mark.parametrize("sig,restarts,requeue", [("SIGUSR1", 0, True), ("SIGUSR1", 50, False), ("SIGTERM", 0, False),
                                                  (None, 0, False)])
def test_requeue_decision(sig, restarts, requeue):
    assert signals.requeue_decision(sig, restarts, 50)[0] is requeue


def test_submitits_signal_requeues_a_sweep_point(monkeypatch):
    assert signals.requeue_decision("SIGUSR2", 0, 50)[0] is False   # not a submitit job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert signals.submitit_signal().name == "SIGUSR2"
    assert signals.requeue_decision("SIGUSR2", 0, 50)[0] is True
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert signals.requeue_signals() == ("SIGUSR1",)


def test_a_job_array_task_is_requeued_alone():
    env = {"SLURM_JOB_ID": "1", "SLURM_ARRAY_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "1"}
    assert signals.slurm_job_id(env) == "1_1"   # "1" would requeue every task of the array
    assert signals.slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"


def _verdict(run, after=None, rc=0, signal=None, **env):
    return slurm.next_phase(run, after, rc, signal, {"SLURM_JOB_ID": "7", **env})


def test_runner_verdicts(tmp_path, capsys):
    run, (prep, sft, export) = _run_folder(tmp_path)
    v = _verdict(run)
    assert v["VERDICT"] == "run" and v["PHASE"] == "prepare"
    assert v["CMD"] == ["srun", "--nodes", "1", "--ntasks", "1", sys.executable, "-c", "pass"]
    open(prep.outputs[0], "w").close()
    v = _verdict(run, "prepare")
    assert v["VERDICT"] == "run" and v["PHASE"] == "sft"
    assert "phase 1 prepare: done in" in capsys.readouterr().out
    # stage 1 stopped on the pre-time-limit signal the ranks got: requeue
    _trainer_ends(sft.outputs[0], 2, "SIGUSR1")
    assert _verdict(run, "sft", rc=1)["VERDICT"] == "requeue"
    # the same, at the requeue limit: give up
    assert _verdict(run, "sft", rc=1, SLURM_RESTART_COUNT="50") == {"VERDICT": "exit", "EXIT": 1}
    assert "giving up" in capsys.readouterr().out
    # stopped on SIGTERM (a cancel): end, no requeue
    _trainer_ends(sft.outputs[0], 2, "SIGTERM")
    assert _verdict(run, "sft", rc=0) == {"VERDICT": "exit", "EXIT": 143}
    # the batch shell's own USR1 while the trainer was dying of something else
    os.remove(sft.status)
    assert _verdict(run, "sft", rc=1, signal="SIGUSR1")["VERDICT"] == "requeue"
    # a failure: the exit code, the log's tail, the phase named
    with open(sft.log, "a") as f:
        f.write("Traceback: boom\n")
    assert _verdict(run, "sft", rc=3) == {"VERDICT": "exit", "EXIT": 3}
    out = capsys.readouterr().out
    assert "phase 2 sft FAILED (exit 3)" in out and "boom" in out and "job failed in phase 'sft'" in out
    # complete, but the signal came meanwhile: requeue before the next phase
    _trainer_ends(sft.outputs[0], 4, None)
    assert _verdict(run, "sft", rc=0, signal="SIGUSR1")["VERDICT"] == "requeue"
    # outside Slurm the same stop says how to resume
    assert slurm.next_phase(run, "sft", 1, "SIGUSR1", {}) == {"VERDICT": "exit", "EXIT": 0}
    os.makedirs(export.atomic + ".tmp")
    assert _verdict(run, "export", rc=0) == {"VERDICT": "done", "EXIT": 0}
    assert "all phases complete" in capsys.readouterr().out
    # a second start skips what is complete
    v = _verdict(run)
    assert v == {"VERDICT": "done", "EXIT": 0}
    assert "phase 2 sft: complete already, skipped" in capsys.readouterr().out


def test_launch_lines_under_slurm_and_here():
    p = train_phase("sft", "stage 1", "/r/sft", ["stage=sft"], 4, inputs=[], nproc=2)
    p.index = 4
    cmd = launch.command(p, python="/venv/python", host_python="python3", port=20004, grace_s=900,
                         slurm={"job_id": "7", "master_addr": "zn1", "srun_args": "--container-image=x.sqsh"}, nodes=2)
    line = shlex.join(cmd)
    assert line.startswith("srun --container-image=x.sqsh --kill-on-bad-exit=1 --nodes 2 --ntasks 2 --ntasks-per-node 1 "
                           "/venv/python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 ")
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 840" in line
    assert "--rdzv-backend c10d --rdzv-endpoint zn1:20004 --rdzv-id 7-sft -m zeda_megatron.train stage=sft" in line
    here = launch.command(p, python="/venv/python", host_python="python3", port=20004, grace_s=900)
    assert shlex.join(here).startswith("/venv/python -m torch.distributed.run --nnodes 1 --nproc-per-node 2 ")
    assert "--master-addr 127.0.0.1 --master-port 20004" in shlex.join(here)


def test_the_bookkeeping_needs_only_the_standard_library(tmp_path):
    """The batch shell's commands run with `python -S` (no site-packages: no torch, Hydra or YAML)."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 1 ="}\n')
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = ROOT
    py = [sys.executable, "-S", "-m", "zeda_megatron.pipeline"]
    r = subprocess.run([*py, "init", "--family", "glm", "--", f"model.hf_dir={teacher}", f"data.prompts={prompts}",
                        f"job.run_dir={run}", "job.device=cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"RUN={run}"
    r = subprocess.run([*py, "next", str(run)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    nxt = (run / "job" / "next.sh").read_text()
    assert "VERDICT=run" in nxt and "PHASE=plan" in nxt and "zeda_megatron.pipeline plan" in nxt
    probe = "import sys, zeda_megatron.pipeline.__main__, zeda_megatron.pipeline.slurm; " \
            "print(sorted(m for m in ('torch', 'omegaconf', 'hydra', 'yaml') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_demo_phases_rerun_what_a_setting_changes(tmp_path):
    from zeda_megatron import demo

    def keys(*argv):
        ps = demo.phases(demo.parse(["--baselines", "off", *argv]), str(tmp_path), str(tmp_path / "cache"), {})
        return {p.name: p.key for p in assign_keys(ps, str(tmp_path))}

    base = keys()
    more_steps = keys("--opd-steps", "31")
    assert [n for n in base if base[n] != more_steps[n]] == ["opd", "export", "evaluate", "report"]
    fewer_prompts = keys("--prompts", "256")
    assert [n for n in base if base[n] != fewer_prompts[n]] == ["data", "sft", "opd", "export", "evaluate", "report"]
