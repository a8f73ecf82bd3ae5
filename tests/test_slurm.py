"""The user's job on a real Slurm: `sbatch slurm/adapt_glm.sh` from a Hugging Face checkpoint to an
evaluated export, and a requeue that works.

The `slurm` tests install Debian's slurm-wlm + munge when missing (root; apt), start a one-node cluster
for this machine in a temporary folder (munged, slurmctld, slurmd in the foreground) and stop exactly the
processes they started. On it the real slurm/adapt_glm.sh runs with CPU-sized overrides (no GPU; the small
GLM-shaped test teacher; 2 ranks, EP=2): every phase to an evaluated export; then a second submission gets
the pre-time-limit signal in stage 1 (`scancel --batch --signal=USR1`, what `#SBATCH --signal=B:USR1@N`
sends), requeues itself and finishes with the same losses as the uninterrupted run.
The other tests (inputs missing, DRY_RUN) run the script directly, without Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLM = os.path.join(ROOT, "slurm", "adapt_glm.sh")
QWEN = os.path.join(ROOT, "slurm", "adapt_qwen.sh")
DAEMONS = ("slurmctld", "slurmd", "munged")


# ---- a one-node Slurm -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_installed() -> None:
    if all(shutil.which(d) for d in (*DAEMONS, "sbatch", "mungekey")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurmctld", "slurmd", "slurm-client", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed (the slurm tests need root and apt):\n{proc.stderr[-2000:]}"


class LocalSlurm:
    """munged + slurmctld + slurmd for this machine under ``root``; :meth:`stop` ends exactly these."""

    def __init__(self, root: str):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(root, "etc", "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def _path(self, *p):
        return os.path.join(self.root, *p)

    def start(self) -> None:
        for d in ("etc", "log", "run", "spool/ctld", "spool/d", "munge"):
            os.makedirs(self._path(d), exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self._path("munge"), 0o755)  # munged: the socket's folder must be o+x
        key = self._path("munge", "munge.key")
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--bits=1024"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = socket.gethostname().split(".")[0]
        sock = self._path("munge", "munge.socket")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=zedatest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={self._path('spool', 'ctld')}
SlurmdSpoolDir={self._path('spool', 'd')}
SlurmctldPidFile={self._path('run', 'slurmctld.pid')}
SlurmdPidFile={self._path('run', 'slurmd.pid')}
SlurmctldLogFile={self._path('log', 'slurmctld.log')}
SlurmdLogFile={self._path('log', 'slurmd.log')}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self._path('log', 'jobcomp.txt')}
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        out = open(self._path("log", "daemons.out"), "ab")
        self.procs.append(subprocess.Popen(
            ["munged", "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={self._path('munge', 'munged.pid')}",
             f"--log-file={self._path('munge', 'munged.log')}", f"--seed-file={self._path('munge', 'munged.seed')}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out))
        for _ in range(100):
            if os.path.exists(sock) or self.procs[0].poll() is not None:
                break
            time.sleep(0.1)
        if not os.path.exists(sock):
            raise RuntimeError("munged did not start:\n" + self.logs())
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out))
        self.procs.append(subprocess.Popen(["slurmd", "-D"], env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out))
        for _ in range(300):
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise RuntimeError("slurm did not come up:\n" + self.logs())

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "daemons.out"):
            try:
                with open(self._path("log", name), errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-30:]))
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def run(self, *cmd, check=True) -> str:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr}")
        return r.stdout

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_done(self, job_id: str, timeout: float) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {self.job(job_id)}")


@pytest.fixture(scope="module")
def slurm():
    _ensure_installed()
    # munged wants every folder above its socket world-executable: pytest's tmp folders are 0700
    root = tempfile.mkdtemp(prefix="zeda-slurm-", dir="/tmp")
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---- inputs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The small GLM-shaped teacher (HF folder with its tokenizer) and 48 prompts."""
    from zeda_megatron.embedded.teacher import build_teacher

    d = tmp_path_factory.mktemp("inputs")
    teacher = str(d / "teacher")
    build_teacher(teacher, family="glm", preset="test", seed=0,
                  overrides=dict(steps=2, warmup=1, code_chars=8000, arith_lines=2000), log=lambda *a: None)
    prompts = str(d / "prompts.jsonl")
    with open(prompts, "w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": f"{i} + {(7 * i) % 13} ="}) + "\n")
    return {"teacher": teacher, "prompts": prompts}


def cpu_overrides(inputs, run_dir) -> list[str]:
    """CPU-sized: 2 ranks (EP=2), tiny batches and lengths, a short evaluation."""
    return [f"model=embedded_glm", f"model.hf_dir={inputs['teacher']}", f"data.prompts={inputs['prompts']}",
            "parallel=ep2", "trainer.seq_length=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            "trainer.recompute=false", "trainer.save_interval=0",
            f"sft.trainer.max_steps={SFT_STEPS}", "opd.trainer.max_steps=2", "opd.trainer.global_batch_size=4",
            "opd.stage.max_new_tokens=8", "generate.max_new_tokens=12", "generate.batch_size=16",
            "eval.arith_problems=16", "eval.dial=[]", "eval.heldout_chunks=4",
            "job.device=cpu", "job.nproc_per_node=2", "job.progress_every_s=5", f"job.run_dir={run_dir}"]


def sbatch(slurm, workdir, overrides) -> str:
    out = slurm.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--chdir={workdir}",
                    f"--output={workdir}/slurm-%j.out", GLM, *overrides)
    return out.strip().split(";")[0]


def summary(run, stage) -> dict:
    with open(os.path.join(run, stage, "summary.json")) as f:
        return json.load(f)


def job_log(workdir, job_id) -> str:
    with open(os.path.join(workdir, f"slurm-{job_id}.out"), errors="replace") as f:
        return f.read()


SFT_STEPS = 30  # enough that the signal (sent at step 2) lands mid stage 1 on a fast machine too
PHASES = ("convert", "generate", "prepare", "sft", "opd", "export", "evaluate")


@pytest.fixture(scope="module")
def full_job(slurm, inputs, tmp_path_factory):
    """One uninterrupted `sbatch slurm/adapt_glm.sh ...` to an evaluated export."""
    work = str(tmp_path_factory.mktemp("job_a"))
    run = os.path.join(work, "runs", "a")
    job_id = sbatch(slurm, work, cpu_overrides(inputs, run))
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
    ov = cpu_overrides(inputs, run) + [f"data.responses={os.path.join(full_job['run'], 'data', 'stage1.jsonl')}"]
    job_id = sbatch(slurm, work, ov)
    metrics = os.path.join(run, "sft", "metrics.jsonl")
    t0, sent_at = time.time(), None
    while time.time() - t0 < 600:
        steps = 0
        if os.path.isfile(metrics):
            with open(metrics) as f:
                steps = sum(1 for line in f if line.strip())
        if steps >= 2:
            slurm.run("scancel", "--batch", "--signal=USR1", job_id)  # what #SBATCH --signal=B:USR1@N does
            sent_at = steps
            break
        if slurm.job(job_id).get("JobState") not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.2)
    assert sent_at is not None, job_log(work, job_id)[-3000:]
    info = slurm.wait_done(job_id, timeout=900)
    log = job_log(work, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:] + slurm.logs()
    assert int(info["Restarts"]) >= 1, info
    assert "SIGUSR1 (time limit near)" in log and "requeueing job" in log
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
    comp = slurm._path("log", "jobcomp.txt")
    with open(comp) as f:
        rows = [line for line in f if f"JobId={job_id} " in line]
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
    for phase in ("check", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate"):
        assert re.search(rf"\d\. {phase}\s", out), phase


def test_dry_run_follows_overrides():
    r = _run_script(GLM, "sft.trainer.global_batch_size=256", "opd.optim.lr=2e-6", "job.nproc_per_node=4",
                    env_extra={"DRY_RUN": "1"}, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert "stage 1 (sft): 235 steps, global batch 256" in r.stdout  # ceil(60000 / 256)
    assert re.findall(r"optimizer: lr ([^ ]+)", r.stdout)[1] == "2e-06"
    assert "1 node(s) x 4 processes" in r.stdout
