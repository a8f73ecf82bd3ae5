#!/usr/bin/env python
"""Build (or reuse) the tiny trained MoE teacher: an HF directory (safetensors + tokenizer).

    python tools/make_tiny_teacher.py --family glm --out runs/teacher/glm [--preset demo|test] [--seed 0]
    python tools/make_tiny_teacher.py --ship      # rebuild the teacher shipped in zeda_megatron/embedded/assets/

The recipe (preset, seed, thread count) and its hash, the weights' sha256 and the held-out NLL /
arithmetic curve every ``eval_every`` steps are written to ``teacher_info.json`` beside the weights.
The ``demo`` preset takes hours on a CPU; the build is deterministic for a recipe (same weights, bit
for bit, on the same thread count).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zeda_megatron.embedded.teacher import PRESETS, SHIPPED_THREADS, build_teacher, shipped_dir  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["glm", "qwen3"], default="glm")
    ap.add_argument("--out", help="output directory (with --ship: the package's assets/ folder)")
    ap.add_argument("--ship", action="store_true", help="rebuild the shipped teacher (demo preset, seed 0) in place")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the build (the weights differ bitwise between thread counts; "
                         f"the shipped teacher was built with {SHIPPED_THREADS})")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    a = ap.parse_args(argv)
    if a.ship:
        if a.preset != "demo" or a.seed != 0 or a.steps:
            ap.error("--ship rebuilds the shipped recipe: the demo preset, seed 0, its own step count")
        a.out, a.threads = shipped_dir(a.family, "demo", 0), a.threads or SHIPPED_THREADS
    if not a.out:
        ap.error("--out DIR (or --ship) is required")
    ov = {"steps": a.steps} if a.steps else None
    info = build_teacher(a.out, family=a.family, preset=a.preset, seed=a.seed, overrides=ov, threads=a.threads)
    keys = ["cached", "hash", "threads", "train_seconds", "steps_done", "final_loss", "heldout_nll", "random_nll",
            "unigram_nll", "weights_sha256"]
    print(json.dumps({k: info.get(k) for k in keys}))
    print(f"teacher: {os.path.abspath(a.out)}")


if __name__ == "__main__":
    main()
