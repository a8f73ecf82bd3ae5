#!/usr/bin/env python
"""Stage-1 data: the teacher's own responses to prompts (self-distillation, as in the reference release).

    python tools/generate_responses.py --teacher HF_DIR --prompts prompts.jsonl --out sft.jsonl \\
        [--max-new-tokens 512] [--temperature 0] [--top-p 1] [--seed 0] [--batch-size 16] [--chat-template] \\
        [-- HYDRA_OVERRIDES...]

A thin entry to ``python -m zeda_megatron.generate`` (the KV-cached megatron sampler, bf16 on GPU,
any TP/EP/PP layout under torchrun, resumable): each flag becomes its override (``model.hf_dir``,
``data.prompts``, ``output``, ``max_new_tokens``, ...); anything after ``--`` is passed through
(e.g. ``parallel=ep2``). Reads JSONL lines with a "prompt" field, writes {"prompt", "response"}
lines in prompt order; every line is checked before the model is loaded; an existing --out is
continued. Greedy with --temperature 0, sampled (seeded) otherwise.

Changed from the earlier HF-``generate`` version: ``--no-bos`` is gone (BOS follows the shared
template rules of zeda_megatron.training.templates, as in training and evaluation).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="Hugging Face directory of the original model")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    p.add_argument("--out", required=True, help="JSONL to write (continued if it exists)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for zeda_megatron.generate (after --)")
    return p.parse_args(argv)


def overrides(args) -> list[str]:
    def q(v) -> str:  # Hydra override value, quoted when it holds characters Hydra would parse
        s = str(v)
        return s if s.replace("/", "").replace(".", "").replace("_", "").replace("-", "").isalnum() else repr(s)

    out = [f"model.hf_dir={q(os.path.abspath(args.teacher))}", "model.hf_config=null",
           f"data.prompts={q(os.path.abspath(args.prompts))}", f"output={q(os.path.abspath(args.out))}",
           f"max_new_tokens={args.max_new_tokens}", f"temperature={args.temperature}", f"top_p={args.top_p}",
           f"seed={args.seed}", f"batch_size={args.batch_size}", f"chat_template={str(args.chat_template).lower()}",
           "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if args.limit:
        out.append(f"limit={args.limit}")
    return out + list(args.overrides)


def main(argv=None) -> int:
    args = parse(argv)
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        raise SystemExit(f"--teacher {args.teacher!r} has no config.json: not a Hugging Face model directory")
    from zeda_megatron import generate

    sys.argv = [sys.argv[0], *overrides(args)]
    generate.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
