#!/usr/bin/env python
"""Build (or reuse) the tiny trained MoE teacher: an HF directory (safetensors + tokenizer).

    python tools/make_tiny_teacher.py --family glm --out runs/teacher/glm [--preset demo|test] [--seed 0]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zeda_megatron.embedded.teacher import PRESETS, build_teacher  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["glm", "qwen3"], default="glm")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    a = ap.parse_args(argv)
    ov = {"steps": a.steps} if a.steps else None
    info = build_teacher(a.out, family=a.family, preset=a.preset, seed=a.seed, overrides=ov)
    keys = ["cached", "train_seconds", "steps_done", "final_loss", "heldout_nll", "random_nll", "unigram_nll"]
    print(json.dumps({k: info.get(k) for k in keys}))
    print(f"teacher: {os.path.abspath(a.out)}")


if __name__ == "__main__":
    main()
