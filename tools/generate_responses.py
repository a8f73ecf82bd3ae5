#!/usr/bin/env python
"""Stage-1 data: the teacher's own responses to prompts (self-distillation, as in the reference release).

    python tools/generate_responses.py --teacher HF_DIR --prompts prompts.jsonl --out sft.jsonl \\
        [--max-new-tokens 512] [--temperature 0] [--seed 0] [--batch-size 16] [--chat-template]

Reads JSONL lines with a "prompt" field (other fields are ignored), writes {"prompt", "response"} lines.
Every line is checked before the model is loaded; an existing --out file is continued, not
overwritten (its prompts are skipped), so an interrupted run loses nothing. Greedy with
--temperature 0, sampled (seeded) otherwise. Uses transformers' generate on one device (a GPU when
available); for very large teachers a serving engine is faster, the output format is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="Hugging Face directory of the original model")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    p.add_argument("--out", required=True, help="JSONL to write (continued if it exists)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    return p.parse_args(argv)


def read_prompts(path: str, limit: int | None) -> list[str]:
    from zeda_megatron.training.data import read_jsonl

    rows, _ = read_jsonl(path, "auto", need="prompt")  # errors name the file, the line and the key
    prompts = [r["prompt"] for r in rows]
    return prompts[:limit] if limit else prompts


def main(argv=None) -> int:
    args = parse(argv)
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        raise SystemExit(f"--teacher {args.teacher!r} has no config.json: not a Hugging Face model directory")
    try:
        prompts = read_prompts(args.prompts, args.limit)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    done = set()
    if os.path.isfile(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["prompt"] for line in f if line.strip()}
    todo = [p for p in prompts if p not in done]
    print(f"[generate] {len(prompts)} prompts, {len(done)} already in {args.out}, {len(todo)} to go", flush=True)
    if not todo:
        return 0
    import torch

    from zeda_megatron.embedded.teacher import generate, load

    model, tok = load(args.teacher)
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if args.chat_template else p for p in todo]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for i in range(0, len(todo), args.batch_size):
            chunk = slice(i, i + args.batch_size)
            outs = generate(model, texts[chunk], tok, max_new_tokens=args.max_new_tokens,
                            do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                            seed=args.seed + i, batch_size=args.batch_size, add_bos=not args.no_bos)
            for prompt, response in zip(todo[chunk], outs):
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
            f.flush()
            print(f"[generate] {min(i + args.batch_size, len(todo))}/{len(todo)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
