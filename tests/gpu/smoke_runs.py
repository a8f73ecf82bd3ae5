"""Helpers of the GPU smoke checks (tests/gpu) that CI also exercises on CPU (tests/test_gpu_smoke.py):
trainer runs on the GPU or in a CPU subprocess, and the comparison of their per-step metrics.

Tolerances (TOLERANCE), for a bf16 GPU run against the fp32 CPU run of the same steps on the same data
and samples. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value); summed over a
layer's matmuls and the residual stream, the first forward/backward of the tiny presets in bf16 differs
from fp32 by about 0.1% in the loss, 2-3% in the gradient norm and a few routing decisions out of every
thousand (measured on CPU by tests/test_gpu_smoke.py::test_bf16_rounding_stays_within_a_third_of_the_tolerance,
which fails if that ever exceeds a third of these bounds). The bounds leave a factor of 3 for the
three to four optimizer steps that follow (the update is normalised by Adam, so the weights drift by a
few bf16 ulps, not more) and for the GPU's kernels (TE/cuBLAS accumulate in fp32 like the CPU). They
are tight enough to fail for a real fault: 1.5x the learning rate already moves the stage-1 loss
beyond them by step 2 (tests/test_gpu_smoke.py::test_comparison_fails_for_a_wrong_learning_rate).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRAPPER = os.path.join(ROOT, "tests", "gpu", "train_wrapped.py")
COMMON = ["trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.seq_length=64", "logging.progress=false"]
# per metric: |got - ref| <= rel * |ref| + abs
TOLERANCE = {
    "loss": (0.02, 0.01),
    "nll": (0.02, 0.01),
    "kl": (0.05, 0.005),
    "group_loss": (0.02, 0.005),
    "grad_norm": (0.10, 0.01),
    "null_share": (0.0, 0.03),
}
# bf16 runs of one code path on different layouts (one GPU vs EP=2, TP=2+SP): the same bounds
LAYOUT_TOLERANCE = TOLERANCE
# save/resume on the GPU: the same steps resumed differ only by the bf16 rounding of non-deterministic
# reductions (atomics in the experts' scatter); one bf16 ulp relative, twice
RESUME_TOLERANCE = {"loss": (2 * 2**-8, 1e-4), "grad_norm": (4 * 2**-8, 1e-4), "null_share": (0.0, 0.01)}


def env(cpu: bool = False, threads: int | None = None, **extra) -> dict:
    e = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    e["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    if cpu:  # the fp32 reference: no GPU visible, the CPU platform of the package
        e.update(CUDA_VISIBLE_DEVICES="", ZEDA_FORCE_CPU="1", OMP_NUM_THREADS=str(threads or 4))
    elif threads:
        e["OMP_NUM_THREADS"] = str(threads)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_command(run_dir, overrides, nproc: int = 1, common: bool = True) -> list[str]:
    launcher = [sys.executable, WRAPPER]
    if nproc > 1:
        from zeda_megatron.distributed import free_port

        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), WRAPPER]
    return launcher + [f"hydra.run.dir={run_dir}", *(COMMON if common else []), *overrides]


def start(run_dir, *overrides, nproc: int = 1, cpu: bool = False, tokens: str | None = None,
          memory: str | None = None, threads: int | None = None, common: bool = True,
          save: bool = True) -> subprocess.Popen:
    """Start a trainer run (in the background); :func:`finish` waits for it and returns its metrics."""
    os.makedirs(run_dir, exist_ok=True)
    extra = {}
    if tokens:
        extra["ZEDA_SMOKE_TOKENS"] = tokens
    if memory:
        extra["ZEDA_SMOKE_MEMORY"] = memory
    if not save:
        extra["ZEDA_SMOKE_NO_SAVE"] = "1"
    log = open(os.path.join(str(run_dir), "train.log"), "w")
    precision = ["trainer.precision=fp32"] if cpu else []
    proc = subprocess.Popen(train_command(run_dir, [*precision, *overrides], nproc, common), cwd=ROOT,
                            env=env(cpu, threads, **extra), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.run_dir, proc.log = str(run_dir), log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> list[dict]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()
    with open(os.path.join(proc.run_dir, "train.log")) as f:
        tail = f.read()[-5000:]
    assert proc.returncode == 0, f"run {proc.run_dir} failed ({proc.returncode}):\n{tail}"
    return metrics(proc.run_dir)


def train(run_dir, *overrides, timeout: float = 600, **kw) -> list[dict]:
    return finish(start(run_dir, *overrides, **kw), timeout)


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(str(run_dir), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def compare(ref: list[dict], got: list[dict], tolerance: dict = TOLERANCE, steps=None) -> dict:
    """Per step and metric: ref, got, |difference| and the bound. ``failures`` lists every value
    outside its bound (and missing steps); an empty list means the runs agree."""
    by_step = {r["step"]: r for r in got}
    rows, failures = [], []
    for r in ref:
        if steps is not None and r["step"] not in steps:
            continue
        g = by_step.get(r["step"])
        if g is None:
            failures.append(f"step {r['step']}: missing")
            continue
        for key, (rel, abs_) in tolerance.items():
            if key not in r:
                continue
            a, b = float(r[key]), float(g[key])
            bound = rel * abs(a) + abs_
            diff = abs(a - b) if math.isfinite(b) else math.inf
            rows.append({"step": r["step"], "metric": key, "ref": a, "got": b, "diff": diff, "bound": bound})
            if not diff <= bound:
                failures.append(f"step {r['step']} {key}: ref {a:.6g} got {b:.6g} (|diff| {diff:.3g} > {bound:.3g})")
    return {"rows": rows, "failures": failures,
            "max_diff_over_bound": max((x["diff"] / x["bound"] for x in rows if x["bound"] > 0), default=0.0)}


def format_comparison(title: str, result: dict) -> str:
    lines = [title, "| step | metric | reference | this run | abs diff | bound |", "|---|---|---|---|---|---|"]
    for x in result["rows"]:
        lines.append(f"| {x['step']} | {x['metric']} | {x['ref']:.6g} | {x['got']:.6g} | {x['diff']:.3g} | {x['bound']:.3g} |")
    return "\n".join(lines)


# ---- grouped vs sequential experts ------------------------------------------------------------------------
_GROUPED = re.compile(r"^(?P<pre>.*\.experts)\.linear_fc(?P<fc>\d)\.weight(?P<e>\d+)$")  # TEGroupedMLP
_SEQUENTIAL = re.compile(r"^(?P<pre>.*\.experts)\.local_experts\.(?P<e>\d+)\.linear_fc(?P<fc>\d)\.weight$")


def expert_param_key(name: str) -> str | None:
    """One name for an expert's weight in either layout (``<layer>.experts.<e>.fc<n>``), the router's
    own name for router parameters, None for anything else."""
    for pat in (_GROUPED, _SEQUENTIAL):
        m = pat.match(name)
        if m:
            return f"{m.group('pre')}.{int(m.group('e'))}.fc{m.group('fc')}"
    return name if ".router." in name else None


def expert_and_router_grads(model) -> dict:
    """{expert_param_key: fp32 gradient on the CPU} of every expert and router parameter."""
    out = {}
    for name, p in model.named_parameters():
        key = expert_param_key(name)
        if key is None:
            continue
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        out[key] = None if g is None else g.detach().float().cpu()
    return out


def compare_grads(ref: dict, got: dict, rel: float = 0.03) -> list[str]:
    """Every key in both, the same zero pattern (an expert no token reached has no gradient in either),
    and ||got - ref|| <= rel * ||ref|| per tensor."""
    fails = []
    if set(ref) != set(got):
        fails.append(f"parameters differ: only in reference {sorted(set(ref) - set(got))[:5]}, "
                     f"only in this run {sorted(set(got) - set(ref))[:5]}")
    for key in sorted(set(ref) & set(got)):
        a, b = ref[key], got[key]
        za, zb = a is None or not a.any(), b is None or not b.any()
        if za or zb:
            if za != zb:
                fails.append(f"{key}: gradient zero in one layout only")
            continue
        d, n = (a - b).norm().item(), a.norm().item()
        if not d <= rel * n:
            fails.append(f"{key}: |diff| {d:.3g} > {rel} x |ref| {n:.3g}")
    return fails
