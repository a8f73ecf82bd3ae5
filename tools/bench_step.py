#!/usr/bin/env python
"""The teacher's overhead in a distillation step: a stage-1 step with the co-located frozen teacher
(forward KL to it) vs a student-only step (plain NLL: the teacher is not run), same model, data,
batch and parallel layout.

    python tools/bench_step.py                                  # the demo's teacher (model=embedded_glm)
    python tools/bench_step.py --steps 8 --nproc 2 -- model=tiny_glm parallel.ep=2

Each variant is one ``python -m zeda_megatron.train`` run (torchrun when --nproc > 1); the step time
is the median of ``step_time_s`` in its metrics.jsonl over the steps after the first (warm-up).
Prints ``teacher overhead ratio: R`` (distillation step / student-only step) and ends with one JSON
line: ``distill_step_s``, ``student_step_s``, ``teacher_overhead_ratio``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=None, help="keep the two runs here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    return p.parse_args(argv)


def _default_overrides(work: str) -> list[str]:
    from zeda_megatron.embedded import corpus

    data = os.path.join(work, "text.jsonl")
    corpus.write_stage1_data(data, n=128, seed=0, mode="text")  # held-in text: code and arithmetic
    cands = sorted(glob.glob(os.path.join(ROOT, ".cache", "zeda", "teacher_glm_demo_s*")))
    if not cands:
        raise SystemExit("no demo teacher in .cache/zeda (run `python -m zeda_megatron.demo`), or pass "
                         "overrides, e.g. `-- model=tiny_glm`")
    return ["model=embedded_glm", f"model.hf_dir={cands[0]}", f"data.path={data}", "trainer.seq_length=128", "trainer.micro_batch_size=4",
            "trainer.global_batch_size=16"]


def _run(args, run_dir: str, overrides: list[str]) -> float:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
            str(_port()), "-m", "zeda_megatron.train"] if args.nproc > 1 else [sys.executable, "-m", "zeda_megatron.train"])
    cmd += ["stage=sft", f"hydra.run.dir={run_dir}", f"trainer.max_steps={args.steps}", "trainer.resume=never",
            *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["step_time_s"] for line in f if line.strip()]
    return statistics.median(times[1:] if len(times) > 1 else times)


def _port() -> int:
    from zeda_megatron.distributed import free_port

    return free_port()


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        overrides = args.overrides or _default_overrides(out)
        distill = _run(args, os.path.join(out, "distill"), overrides + ["stage.kl_weight=1.0", "stage.nll_weight=0.0"])
        student = _run(args, os.path.join(out, "student_only"), overrides + ["stage.kl_weight=0.0", "stage.nll_weight=1.0"])
    ratio = distill / student
    print(f"distillation step {distill:.3f} s, student-only step {student:.3f} s", flush=True)
    print(f"teacher overhead ratio: {ratio:.2f}", flush=True)
    return dict(distill_step_s=distill, student_step_s=student, teacher_overhead_ratio=ratio, steps=args.steps,
                nproc=args.nproc, overrides=overrides)


def main(argv=None) -> int:
    print(json.dumps(run(parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
