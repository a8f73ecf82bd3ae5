#!/usr/bin/env python
"""Generation speed of an exported null-expert model vs the original, through the same code path.

    python tools/bench_generate.py                       # runs/demo/hf vs the demo's teacher
    python tools/bench_generate.py --model HF_DIR --teacher TEACHER_HF_DIR [--batch 1 16] [--reps 5]

The original is the teacher written as a PlusPlus directory with its null experts masked
(``use_zce_mask=True``: bit for bit the original routing), so both models run the same modeling code
(zeda_megatron/bridge/remote_code: the expert loop visits only the experts some token picked, and null
slots are skipped: no compute). For each batch size: prefill tokens/s (one forward over B prompts of
``--prompt-len`` tokens) and decode tokens/s (``--new-tokens`` greedy one-token steps with the KV
cache), each the best (minimum time) of ``--reps`` runs, the two models interleaved so that a noisy
machine hits both alike (the minimum is the least disturbed run of each). The null share is counted over the measured forwards. The last line is one JSON object:
``prefill_speedup``, ``decode_speedup`` (geometric mean over the batch sizes), ``routed_null_share``
and the per-batch figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="exported null-expert HF directory (default: runs/demo/hf)")
    p.add_argument("--teacher", default=None, help="the original HF directory (default: the demo's teacher)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--null-logit-bias", type=float, default=None, help="compute dial for the adapted model")
    return p.parse_args(argv)


def default_dirs():
    model = os.path.join(ROOT, "runs", "demo", "hf")
    summary = os.path.join(ROOT, "runs", "demo", "report", "summary.json")
    teacher = None
    if os.path.isfile(summary):
        with open(summary) as f:
            teacher = json.load(f).get("teacher_dir")
    if not teacher:
        cands = sorted(glob.glob(os.path.join(ROOT, ".cache", "zeda", "teacher_glm_demo_s*")))
        teacher = cands[0] if cands else None
    return model, teacher


def _prompts(tok, batch, length, seed=0):
    from zeda_megatron.embedded import corpus

    text = "\n".join(corpus.heldout_code(seed, n_chunks=batch * 2, chunk_chars=length * 8))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    import torch

    need = batch * length
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return torch.tensor(ids, dtype=torch.long).view(batch, length)


def time_model(model, prompts, new_tokens):
    """(prefill seconds, decode seconds) of one run: a forward over the prompts, then greedy steps."""
    import torch

    with torch.no_grad():
        best = float("inf")
        for _ in range(3):  # the prefill is short: best of 3
            t0 = time.perf_counter()
            out = model(input_ids=prompts, use_cache=True)
            best = min(best, time.perf_counter() - t0)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t3 = time.perf_counter()
    return best, t3 - t2


def run(args) -> dict:
    import torch

    from zeda_megatron.bridge.remote_code.zce_common import reset_routing_stats, routing_stats
    from zeda_megatron.eval.models import load, plusplus_from_teacher, set_null_logit_bias

    torch.set_num_threads(args.threads)
    model_dir, teacher_dir = args.model, args.teacher
    if model_dir is None or teacher_dir is None:
        dm, dt = default_dirs()
        model_dir, teacher_dir = model_dir or dm, teacher_dir or dt
    for what, d in (("--model", model_dir), ("--teacher", teacher_dir)):
        if not d or not os.path.isfile(os.path.join(d, "config.json")):
            raise SystemExit(f"{what}: no HF directory at {d!r} (run `python -m zeda_megatron.demo` first, or pass it)")
    adapted, tok = load(model_dir)
    if args.null_logit_bias is not None:
        set_null_logit_bias(adapted, args.null_logit_bias)
    with tempfile.TemporaryDirectory() as tmp:
        plusplus_from_teacher(teacher_dir, os.path.join(tmp, "orig"), num_null=1, mask_null=True)
        original, _ = load(os.path.join(tmp, "orig"))
    results = {}
    for b in args.batch:
        prompts = _prompts(tok, b, args.prompt_len)
        for m in (adapted, original):  # warm-up
            time_model(m, prompts[:, :16], 2)
        reset_routing_stats(adapted)
        t = {"adapted": ([], []), "original": ([], [])}
        for _ in range(args.reps):
            for name, m in (("adapted", adapted), ("original", original)):
                pf, dc = time_model(m, prompts, args.new_tokens)
                t[name][0].append(pf)
                t[name][1].append(dc)
        share = routing_stats(adapted)["null_share"]
        med = {k: (min(v[0]), min(v[1])) for k, v in t.items()}
        r = dict(
            batch=b, routed_null_share=share,
            prefill_tok_s={k: b * args.prompt_len / v[0] for k, v in med.items()},
            decode_tok_s={k: b * args.new_tokens / v[1] for k, v in med.items()},
        )
        r["prefill_speedup"] = med["original"][0] / med["adapted"][0]
        r["decode_speedup"] = med["original"][1] / med["adapted"][1]
        results[b] = r
        print(f"batch {b:>3}: prefill {r['prefill_tok_s']['original']:.0f} -> {r['prefill_tok_s']['adapted']:.0f} tok/s "
              f"(x{r['prefill_speedup']:.2f}), decode {r['decode_tok_s']['original']:.0f} -> "
              f"{r['decode_tok_s']['adapted']:.0f} tok/s (x{r['decode_speedup']:.2f}), null share {share:.1%}",
              flush=True)
    gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))  # noqa: E731
    reset_routing_stats(adapted)
    shares = [r["routed_null_share"] for r in results.values()]
    return dict(prefill_speedup=gm([r["prefill_speedup"] for r in results.values()]),
                decode_speedup=gm([r["decode_speedup"] for r in results.values()]),
                routed_null_share=sum(shares) / len(shares), model=os.path.abspath(model_dir),
                teacher=os.path.abspath(teacher_dir), threads=args.threads, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, reps=args.reps, per_batch={str(k): v for k, v in results.items()})


def main(argv=None) -> int:
    res = run(parse_args(argv))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
