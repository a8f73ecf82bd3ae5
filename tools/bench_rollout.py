#!/usr/bin/env python
"""Rollout speed: KV-cached sampling vs prefix recompute (zeda_megatron.training.rollout.sample).

    python tools/bench_rollout.py                      # the issue's setting (several minutes on 1 core)
    python tools/bench_rollout.py --hidden 64 --layers 2 --experts 4 --topk 2 --vocab 512 \\
        --new-tokens 8 --checkpoints 4,8 --batch 2 --prompt 4   # seconds (CI)

A randomly initialised GLM-4.7-Flash-shaped megatron model (MLA, first layer dense, shared expert,
sigmoid router with expert bias; default hidden 512, 6 layers, 16 experts top-4 plus 8 null experts,
vocab 8192), batch 4, 16-token prompts, greedy, no EOS (every row decodes all new tokens). Both
modes run the same sampler, one with megatron-core's StaticInferenceContext, one recomputing the whole
prefix for every token; tokens/s = generated tokens / wall time up to each checkpoint (128/256/384).
Prints a table, then one JSON line: cached_tokens_per_s, recompute_tokens_per_s, speedup (at the
last checkpoint), peak_rss_bytes, identical_tokens, and the per-checkpoint figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--null-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=384)
    p.add_argument("--checkpoints", default="128,256,384", help="report tokens/s after this many new tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def glm_config(a) -> dict:
    h, heads = a.hidden, max(2, a.hidden // 64)
    return dict(
        architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite", vocab_size=a.vocab, hidden_size=h,
        intermediate_size=2 * h, moe_intermediate_size=max(16, h // 2), num_hidden_layers=a.layers,
        num_attention_heads=heads, num_key_value_heads=heads, n_routed_experts=a.experts, n_shared_experts=1,
        num_experts_per_tok=a.topk, kv_lora_rank=max(16, h // 4), q_lora_rank=max(16, 3 * h // 8),
        qk_rope_head_dim=max(8, h // 16), qk_nope_head_dim=max(8, h // 16), v_head_dim=max(8, h // heads),
        routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True,
        mlp_layer_types=["dense"] + ["sparse"] * (a.layers - 1),
        max_position_embeddings=a.prompt + a.new_tokens + 8, rms_norm_eps=1e-5, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def run(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.mcore.config import NullExpertSettings
    from zeda_megatron.training.rollout import sample

    init_parallel(seed=a.seed)
    model, _, _ = build_model(glm_config(a), NullExpertSettings(a.null_experts, 2.0))
    model.eval()
    checkpoints = sorted({int(c) for c in a.checkpoints.split(",") if c} | {a.new_tokens})
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(1, a.vocab, (a.prompt,), generator=g).tolist() for _ in range(a.batch)]
    out = {}
    for mode, cache in (("cached", True), ("recompute", False)):
        marks = {}
        t0 = time.perf_counter()

        def on_token(n, marks=marks, t0=t0):
            if n in checkpoints:
                marks[n] = time.perf_counter() - t0

        r = sample(model, [prompts], max_new_tokens=a.new_tokens, eos_id=-1, pad_id=0, temperature=0.0,
                   use_cache=cache, record_routing=False, on_token=on_token)
        out[mode] = {"tokens_per_s": {n: a.batch * n / s for n, s in marks.items()}, "seconds": marks,
                     "responses": r.responses}
        print(f"[bench_rollout] {mode}: {marks[a.new_tokens]:.1f} s for {a.new_tokens} new tokens x {a.batch}",
              flush=True)
    destroy_parallel()
    cached, recompute = out["cached"]["tokens_per_s"], out["recompute"]["tokens_per_s"]
    print("| new tokens | cached tok/s | recompute tok/s | speedup |")
    print("|---|---|---|---|")
    for n in checkpoints:
        print(f"| {n} | {cached[n]:.1f} | {recompute[n]:.1f} | {cached[n] / recompute[n]:.2f} |")
    last = a.new_tokens
    return {
        "cached_tokens_per_s": cached[last], "recompute_tokens_per_s": recompute[last],
        "speedup": cached[last] / recompute[last],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "identical_tokens": out["cached"]["responses"] == out["recompute"]["responses"],
        "speedup_at": {str(n): cached[n] / recompute[n] for n in checkpoints},
        "setting": {"hidden": a.hidden, "layers": a.layers, "experts": a.experts, "null_experts": a.null_experts,
                    "topk": a.topk, "vocab": a.vocab, "batch": a.batch, "prompt": a.prompt,
                    "new_tokens": a.new_tokens, "threads": a.threads},
    }


def main(argv=None) -> int:
    res = run(parse(argv))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
