"""A phase, declared once: what it runs, what it reads and writes, what decides its result, how it is
launched. The demo's and the Slurm job's phase lists are made of these (standard library only).

``cmd`` holds the interpreter's arguments (``["-m", "zeda_megatron.train", ...]`` or ``[script, ...]``);
the runner puts the interpreter and the launcher in front (:mod:`launch`). A phase's fingerprint
(:func:`assign_keys`) covers its command, launcher and ``identity`` with the run folder abstracted (a
copied run folder still matches) plus the fingerprints of the phases that produce its inputs, so changing
a setting reruns that phase and everything downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torchrun: one torchrun per node of the phase, nproc ranks each; single: one process (first node);
# every-node: one process on each node of the allocation (the environment check); host: the batch shell's
# own python3, standard library only (bookkeeping before the environment is known); none: nothing to run
# (the outputs are given); call: an in-process Python call (the local runner only)
LAUNCHERS = ("torchrun", "single", "every-node", "host", "none", "call")
TRAIN_MODULE = "zeda_megatron.train"
STATUS_FILE = "status.json"   # what a training stage's trainer writes into its run folder when it ends


@dataclasses.dataclass
class Phase:
    name: str
    title: str
    cmd: list[str] = dataclasses.field(default_factory=list)
    launcher: str = "single"
    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    identity: Any = None          # what else decides the result: settings not in cmd, an in-process call's arguments
    nproc: int = 1                # processes per node (torchrun)
    nodes: int = 0                # nodes it runs on; 0: every node of the allocation
    atomic: str = ""              # an output folder written as <atomic>.tmp and renamed when the phase succeeds
    status: str = ""              # the status file its command writes when it ends (a training stage's trainer)
    max_steps: int = 0            # a training stage: complete once its status says it reached this step
    always: bool = False          # never complete: runs every time (the environment check, a self-caching build)
    intro: list[str] = dataclasses.field(default_factory=list)   # what it will do (head of its log)
    log: str = ""
    index: int = 0                # its number in the job (logs/N-name.log, "phase N name")
    group: str = ""               # a step of another phase (the check's steps log into the check's log)
    advice: str = ""              # what to do when it fails (said with the failure)
    key: str = ""                 # fingerprint (assign_keys)
    call: Callable[[], Any] | None = None   # launcher "call" (never serialised)

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"phase {self.name}: launcher {self.launcher!r} is not one of {LAUNCHERS}")

    @property
    def training(self) -> bool:
        return self.max_steps > 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("call")
        d["cmd"] = [str(c) for c in self.cmd]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Phase":
        names = {f.name for f in dataclasses.fields(cls)} - {"call"}
        return cls(**{k: v for k, v in d.items() if k in names})


def fingerprint(obj, run_dir: str = "") -> str:
    """Key of a phase's work; ``run_dir`` is abstracted (a copied run folder still matches)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    if run_dir:
        blob = blob.replace(os.path.abspath(run_dir), "<RUN>")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def assign_keys(phases: list[Phase], run_dir: str, producers: dict[str, str] | None = None) -> list[Phase]:
    """Give every phase its fingerprint, in order: its command, launcher and identity, and the keys of
    the earlier phases whose outputs it reads (``producers``: output path -> key, updated)."""
    producers = {} if producers is None else producers
    for p in phases:
        upstream = sorted({producers[os.path.normpath(i)] for i in p.inputs if os.path.normpath(i) in producers})
        p.key = fingerprint([[str(c) for c in p.cmd], p.launcher, p.identity, upstream], run_dir)
        register(p, producers)
    return phases


def register(phase: Phase, producers: dict[str, str]) -> None:
    """Record ``phase`` as the producer of its outputs."""
    for o in phase.outputs:
        producers[os.path.normpath(o)] = phase.key


def number(phases: list[Phase], run_dir: str, first: int = 0) -> list[Phase]:
    """Number the phases (N) and give each its log, ``run_dir/logs/N-name.log`` (a step logs into its
    group's log)."""
    n = first
    logs = {}
    for p in phases:
        if p.group:
            p.index, p.log = logs[p.group]
            continue
        p.index = n
        p.log = p.log or os.path.join(run_dir, "logs", f"{n}-{p.name}.log")
        logs[p.name] = (p.index, p.log)
        n += 1
    return phases


# ---- the phases both pipelines declare -----------------------------------------------------------------
def train_phase(name: str, title: str, run_dir: str, overrides: list[str], max_steps: int, *, inputs: list[str],
                nproc: int = 1, launcher: str = "torchrun", intro: list[str] | None = None) -> Phase:
    """A training stage: ``python -m zeda_megatron.train OVERRIDES hydra.run.dir=RUN_DIR``; complete once
    the trainer's status file (RUN_DIR/status.json) says it reached ``max_steps``."""
    return Phase(name, title, ["-m", TRAIN_MODULE, *overrides, f"hydra.run.dir={run_dir}"], launcher=launcher,
                 inputs=list(inputs), outputs=[run_dir], nproc=nproc, status=os.path.join(run_dir, STATUS_FILE),
                 max_steps=int(max_steps), intro=list(intro or []))


def export_phase(name: str, title: str, checkpoint: str, out: str, *, inputs: list[str], ep: int = 1,
                 extra: list[str] | None = None, launcher: str = "single", intro: list[str] | None = None) -> Phase:
    """A megatron-core checkpoint to a Hugging Face folder (tools/export_hf.py), written beside ``out``
    and renamed once complete."""
    cmd = [os.path.join(REPO, "tools", "export_hf.py"), "--checkpoint", checkpoint, "--out", out + ".tmp",
           "--ep", str(ep), *(extra or [])]
    return Phase(name, title, cmd, launcher=launcher, inputs=list(inputs), outputs=[out], nproc=ep, atomic=out,
                 intro=list(intro or []))
