"""A real Slurm on this machine for the `slurm` and `multinode` tests: Debian's slurm-wlm + munge
(installed when missing; root and apt), one `munged` and one `slurmctld`, and one `slurmd` per node.

* One node: the machine itself (its hostname, 127.0.0.1).
* Several nodes: each node is a network namespace made by the test (``ip netns``), with its own hostname
  (``unshare --uts``), its own /etc/hosts naming every node (a private mount namespace), loopback, and one
  end of a veth pair whose other end is on a bridge the test made; the bridge carries the controller's
  address, so slurmctld and munged run beside the nodes in the machine's own namespace. Traffic stays on
  addresses the test made. torchrun, gloo and srun on a node resolve the other nodes' names as on a real
  cluster.

:meth:`LocalSlurm.stop` stops exactly the processes it started and removes every namespace, link and
file it made.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLM = os.path.join(ROOT, "slurm", "adapt_glm.sh")
QWEN = os.path.join(ROOT, "slurm", "adapt_qwen.sh")
DAEMONS = ("slurmctld", "slurmd", "munged")
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(nodes: int = 1) -> None:
    """slurmctld, slurmd, the clients and munge (and iproute2 for several nodes), from Debian's archive."""
    need = [*DAEMONS, "sbatch", "mungekey"] + (["ip", "unshare", "nsenter"] if nodes > 1 else [])
    if all(shutil.which(d) for d in need):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    pkgs = ["slurmctld", "slurmd", "slurm-client", "munge"] + (["iproute2", "util-linux"] if nodes > 1 else [])
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed (the slurm tests need root and apt):\n{proc.stderr[-2000:]}"


def _sh(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _free_subnet() -> str:
    """A 10.x.y.0/24 no interface of this machine uses (the first three octets)."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    rng = random.Random()
    for _ in range(100):
        net = f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}"
        if f" {net}." not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class LocalSlurm:
    """munged + slurmctld + ``nodes`` slurmd under ``root``; :meth:`stop` ends exactly these."""

    def __init__(self, root: str, nodes: int = 1):
        self.root, self.nodes = root, nodes
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(root, "etc", "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.tag = f"{os.getpid() % 10000:04d}{random.randint(0, 99):02d}"
        self.netns: list[str] = []
        self.links: list[str] = []
        self.names: list[str] = []

    def path(self, *p):
        return os.path.join(self.root, *p)

    # ---- the network of several nodes --------------------------------------------------------------------
    def _network(self) -> tuple[str, list[str]]:
        """A bridge with the controller's address and one namespace per node; (controller address,
        node addresses)."""
        net = _free_subnet()
        bridge = f"zbr{self.tag}"
        _sh("ip", "link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        _sh("ip", "addr", "add", f"{net}.1/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        addrs = []
        for i in range(1, self.nodes + 1):
            ns, host_end, node_end = f"zeda{self.tag}n{i}", f"zv{self.tag}{i}", f"zp{self.tag}{i}"
            _sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self.links.append(host_end)
            _sh("ip", "link", "set", node_end, "netns", ns)
            _sh("ip", "link", "set", host_end, "master", bridge)
            _sh("ip", "link", "set", host_end, "up")
            _sh("ip", "-n", ns, "link", "set", node_end, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{net}.{i + 1}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            addrs.append(f"{net}.{i + 1}")
        return f"{net}.1", addrs

    def start(self) -> None:
        for d in ("etc", "log", "run", "spool/ctld", "munge"):
            os.makedirs(self.path(d), exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.path("munge"), 0o755)  # munged: the socket's folder must be o+x
        key = self.path("munge", "munge.key")
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--bits=1024"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = socket.gethostname().split(".")[0]
        hw = re.sub(r"^NodeName=\S+\s*", "", node)   # CPUs=.. Boards=.. RealMemory=..
        if self.nodes == 1:
            ctl_addr, nodes_conf = "127.0.0.1", f"{node} NodeAddr=127.0.0.1 State=UNKNOWN"
            self.names = [node.split()[0].split("=", 1)[1]]
        else:
            ctl_addr, addrs = self._network()
            self.names = [f"zn{i}" for i in range(1, self.nodes + 1)]
            nodes_conf = "\n".join(f"NodeName={n} NodeHostname={n} NodeAddr={a} {hw} State=UNKNOWN"
                                   for n, a in zip(self.names, addrs))
            with open(self.path("etc", "hosts"), "w") as f:
                f.write(f"127.0.0.1 localhost\n{ctl_addr} {host}\n" + "".join(f"{a} {n}\n" for n, a in zip(self.names, addrs)))
        for n in self.names:
            os.makedirs(self.path("spool", f"d-{n}"), exist_ok=True)
        sock = self.path("munge", "munge.socket")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=zedatest
SlurmctldHost={host}({ctl_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={self.path('spool', 'ctld')}
SlurmdSpoolDir={self.path('spool', 'd-%n')}
SlurmctldPidFile={self.path('run', 'slurmctld.pid')}
SlurmdPidFile={self.path('run', 'slurmd-%n.pid')}
SlurmctldLogFile={self.path('log', 'slurmctld.log')}
SlurmdLogFile={self.path('log', 'slurmd-%n.log')}
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
JobCompLoc={self.path('log', 'jobcomp.txt')}
{nodes_conf}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        out = open(self.path("log", "daemons.out"), "ab")
        self.procs.append(subprocess.Popen(
            ["munged", "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={self.path('munge', 'munged.pid')}",
             f"--log-file={self.path('munge', 'munged.log')}", f"--seed-file={self.path('munge', 'munged.seed')}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out))
        for _ in range(100):
            if os.path.exists(sock) or self.procs[0].poll() is not None:
                break
            time.sleep(0.1)
        if not os.path.exists(sock):
            raise RuntimeError("munged did not start:\n" + self.logs())
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=out))
        if self.nodes == 1:
            self.procs.append(subprocess.Popen(["slurmd", "-D"], env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=out))
        else:
            for ns, name in zip(self.netns, self.names):
                # its own network, hostname and /etc/hosts (nsenter, not `ip netns exec`, which would
                # remount /sys without the cgroup filesystem slurmd needs); `exec`s keep the started
                # process the slurmd itself
                inner = f"mount --bind {self.path('etc', 'hosts')} /etc/hosts && hostname {name} && exec slurmd -D -N {name}"
                self.procs.append(subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private",
                     "sh", "-c", inner], env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out))
        for _ in range(300):
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and len(states) == self.nodes and set(states.values()) == {"idle"}:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise RuntimeError("slurm did not come up:\n" + self.logs())

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.path("log"))) if os.path.isdir(self.path("log")) else []:
            if name.endswith((".log", ".out")):
                with open(self.path("log", name), errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd(s), slurmctld, munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        for ns in self.netns:      # the node's end of its veth pair goes with it, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.netns.clear()
        self.links.clear()

    # ---- clients --------------------------------------------------------------------------------------------
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
            if info.get("JobState") in DONE_STATES:
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {self.job(job_id)}")

    def runs_of(self, job_id: str) -> list[str]:
        """Slurm's own record of the job (jobcomp: one line per run of a requeued job)."""
        with open(self.path("log", "jobcomp.txt")) as f:
            return [line for line in f if f"JobId={job_id} " in line]

    def sbatch(self, script: str, workdir: str, overrides: list[str], *options: str) -> str:
        out = self.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--chdir={workdir}",
                       f"--output={workdir}/slurm-%j.out", *options, script, *overrides)
        return out.strip().split(";")[0]


def start_cluster(nodes: int = 1):
    """Started cluster and its cleanup (a generator for a fixture)."""
    ensure_installed(nodes)
    # munged wants every folder above its socket world-executable: pytest's tmp folders are 0700
    root = tempfile.mkdtemp(prefix="zeda-slurm-", dir="/tmp")
    cluster = LocalSlurm(root, nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# fixtures for the test modules (imported there by name)
@pytest.fixture(scope="module")
def slurm():
    """A one-node Slurm for this machine."""
    yield from start_cluster(nodes=1)


@pytest.fixture(scope="module")
def slurm2():
    """A two-node Slurm: two network namespaces, zn1 and zn2."""
    yield from start_cluster(nodes=2)


@pytest.fixture(scope="session")
def slurm_inputs(tmp_path_factory):
    """The job's inputs (:func:`job_inputs`), one folder for the session."""
    return job_inputs(str(tmp_path_factory.getbasetemp() / "slurm-inputs"))


# ---- the job's inputs and its CPU-sized overrides -------------------------------------------------------------
def job_inputs(folder: str) -> dict:
    """The small GLM-shaped teacher (HF folder with its tokenizer) and 48 prompts, built once per folder
    (the teacher's build caches itself: test modules of one session share it through one folder)."""
    from zeda_megatron.embedded.teacher import build_teacher

    teacher = os.path.join(folder, "teacher")
    build_teacher(teacher, family="glm", preset="test", seed=0,
                  overrides=dict(steps=2, warmup=1, code_chars=8000, arith_lines=2000), log=lambda *a: None)
    prompts = os.path.join(folder, "prompts.jsonl")
    if not os.path.isfile(prompts):
        with open(prompts + ".tmp", "w") as f:
            for i in range(48):
                f.write(json.dumps({"prompt": f"{i} + {(7 * i) % 13} ="}) + "\n")
        os.replace(prompts + ".tmp", prompts)
    return {"teacher": teacher, "prompts": prompts}


def cpu_overrides(inputs: dict, run_dir: str, sft_steps: int, nproc: int = 2, opd_batch: int = 4) -> list[str]:
    """CPU-sized: EP=2, tiny batches and lengths, a short evaluation (``opd_batch``: stage 2's global batch,
    a multiple of micro batch 2 x the data-parallel size)."""
    return ["model=embedded_glm", f"model.hf_dir={inputs['teacher']}", f"data.prompts={inputs['prompts']}",
            "parallel=ep2", "trainer.seq_length=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            "trainer.recompute=false", "trainer.save_interval=0",
            f"sft.trainer.max_steps={sft_steps}", "opd.trainer.max_steps=2", f"opd.trainer.global_batch_size={opd_batch}",
            "opd.stage.max_new_tokens=8", "generate.max_new_tokens=12", "generate.batch_size=16",
            "eval.arith_problems=16", "eval.dial=[]", "eval.heldout_chunks=4",
            "job.device=cpu", f"job.nproc_per_node={nproc}", "job.progress_every_s=5", f"job.run_dir={run_dir}"]


def summary(run: str, stage: str) -> dict:
    with open(os.path.join(run, stage, "summary.json")) as f:
        return json.load(f)


def losses(run: str, stage: str) -> list[tuple[int, float]]:
    """(step, loss) of every step of a stage (metrics.jsonl; a resumed stage rewrote it from its checkpoint)."""
    with open(os.path.join(run, stage, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, filter(str.strip, f))]


def job_log(workdir: str, job_id: str) -> str:
    with open(os.path.join(workdir, f"slurm-{job_id}.out"), errors="replace") as f:
        return f.read()


def signal_when(cluster: LocalSlurm, job_id: str, metrics: str, steps: int, *scancel_args: str,
                timeout: float = 900) -> int | None:
    """Send ``scancel *scancel_args job_id`` once ``metrics`` (a metrics.jsonl) has ``steps`` lines;
    the number of lines it had then (None if the job ended first)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        n = 0
        if os.path.isfile(metrics):
            with open(metrics) as f:
                n = sum(1 for line in f if line.strip())
        if n >= steps:
            cluster.run("scancel", *scancel_args, job_id)
            return n
        if cluster.job(job_id).get("JobState") not in ("PENDING", "RUNNING"):
            return None
        time.sleep(0.2)
    return None
