#!/usr/bin/env python
"""Rollout throughput: static batches vs refilled slots (zeda_megatron.training.rollout.sample).

    python tools/bench_rollout.py                         # the documented setting (minutes on 1 core)
    python tools/bench_rollout.py --hidden 64 --layers 2 --experts 4 --topk 2 --vocab 512 \\
        --prompts 96 --slots 8 --limit 64                 # seconds (CI)

A randomly initialised GLM-4.7-Flash-shaped megatron model (MLA, first layer dense, shared expert,
sigmoid router with expert bias, null experts; default hidden 256, 4 layers, 16 experts top-4 plus
8 null experts, vocab 4096) samples greedy responses to ``--prompts`` random prompts of
``--prompt-len`` tokens. Response lengths follow a long-tailed distribution: lognormal with median
``--limit``/8 and sigma ``--sigma``, rounded, cut to [1, --limit] (imposed as each prompt's length
limit, no EOS). Both modes run the same engine, model, prompts and lengths with ``--slots`` decode
slots: *static* admits a new batch only when every slot is free (a batch lasts as long as its
longest response); *refill* gives a freed slot the next prompt at once.

Figures per mode: forwards, slot utilisation (slot-steps that fed a live sequence / slots x
forwards), real tokens per forward (prompt and response tokens fed / forwards), sampled tokens/s,
host synchronisations per step (the sampler's blocking device-to-host copies / forwards). Then the
KV cache bytes per token and layer for GLM-4.7-Flash's reference shapes per TP rank at TP4 (bf16),
full K/V vs the MLA latent, as the memory plan computes them, and the tiny model's cache as the
engine allocated it, latent vs full. Prints a table, then one JSON line with
``static_slot_utilisation``, ``refill_slot_utilisation``, ``tokens_per_forward_ratio`` (refill /
static), ``host_syncs_per_step``, ``latent_kv_fraction`` and the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--null-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--limit", type=int, default=256, help="response length limit (the lognormal is cut here)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the response lengths")
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
        max_position_embeddings=a.prompt_len + a.limit + 8, rms_norm_eps=1e-5, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def response_lengths(n: int, limit: int, sigma: float, seed: int) -> list[int]:
    """Lognormal(median limit/8, sigma), rounded, cut to [1, limit]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.exp(math.log(limit / 8) + sigma * z).round().clamp(1, limit)
    return [int(v) for v in x]


def reference_kv_fraction(tp: int = 4) -> dict:
    """KV bytes per token and layer for GLM-4.7-Flash (conf/model/glm47_flash.yaml) per TP rank, bf16:
    full K/V vs the MLA latent, as the memory plan counts them."""
    from omegaconf import OmegaConf

    from zeda_megatron.plan.memory import kv_bytes_per_token_layer
    from zeda_megatron.plan.shapes import shapes_of
    from zeda_megatron.spec import compose

    s = shapes_of(OmegaConf.to_container(compose(["model=glm47_flash"], run_dir=".").model.hf_config, resolve=True))
    full = kv_bytes_per_token_layer(s, tp, "full", 2)
    latent = kv_bytes_per_token_layer(s, tp, "latent", 2)
    return {"full": full, "latent": latent, "fraction": latent / full, "tp": tp}


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
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(1, a.vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    lengths = response_lengths(a.prompts, a.limit, a.sigma, a.seed)
    out = {}
    for mode, refill in (("static", False), ("refill", True)):
        r = sample(model, [prompts], max_new_tokens=[lengths], eos_id=-1, pad_id=0, temperature=0.0,
                   slots=a.slots, refill=refill, record_routing=False)
        st = r.stats
        out[mode] = {"forwards": st.forwards, "slot_utilisation": st.slot_utilisation,
                     "tokens_per_forward": st.tokens_per_forward, "tokens_per_s": st.sampled_tokens / st.seconds,
                     "host_syncs_per_step": st.host_syncs_per_step, "seconds": st.seconds,
                     "responses": r.responses, "cache_bytes": st.cache_bytes}
        print(f"[bench_rollout] {mode}: {st.forwards} forwards, {st.seconds:.1f} s", flush=True)
    # the tiny model's cache as allocated: latent vs full, same prompts (a short run)
    from zeda_megatron.plan.memory import kv_bytes_per_token_layer
    from zeda_megatron.plan.shapes import shapes_of

    tiny, planned = {}, {}
    shapes = shapes_of(glm_config(a))
    for cache in ("latent", "full"):
        r = sample(model, [prompts[:2]], max_new_tokens=2, eos_id=-1, pad_id=0, temperature=0.0,
                   record_routing=False, mla_cache=cache)
        tiny[cache] = r.stats.cache_bytes
        # slots 2 + the scratch slot, of prompt + 2 positions, on every layer, fp32
        planned[cache] = 3 * (a.prompt_len + 2) * a.layers * kv_bytes_per_token_layer(shapes, 1, cache, 4)
    destroy_parallel()
    ref = reference_kv_fraction(4)
    s, f = out["static"], out["refill"]
    print(f"{a.prompts} prompts of {a.prompt_len} tokens, {a.slots} slots, responses lognormal(median "
          f"{a.limit / 8:g}, sigma {a.sigma}) cut at {a.limit}: mean {sum(lengths) / len(lengths):.1f}, "
          f"max {max(lengths)}")
    print("| mode | forwards | slot utilisation | real tokens / forward | sampled tokens/s | host syncs / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in (("static batches", s), ("refilled slots", f)):
        print(f"| {name} | {m['forwards']} | {m['slot_utilisation']:.3f} | {m['tokens_per_forward']:.2f} | "
              f"{m['tokens_per_s']:.1f} | {m['host_syncs_per_step']:.2f} |")
    print(f"KV bytes per token and layer, GLM-4.7-Flash per TP rank at TP{ref['tp']} (bf16): full K/V "
          f"{ref['full']}, latent {ref['latent']} ({ref['fraction']:.3f} of full); tiny model as allocated: "
          f"latent {tiny['latent']} B, full {tiny['full']} B ({tiny['latent'] / tiny['full']:.3f})")
    return {
        "static_slot_utilisation": s["slot_utilisation"], "refill_slot_utilisation": f["slot_utilisation"],
        "static_tokens_per_forward": s["tokens_per_forward"], "refill_tokens_per_forward": f["tokens_per_forward"],
        "tokens_per_forward_ratio": f["tokens_per_forward"] / s["tokens_per_forward"],
        "static_tokens_per_s": s["tokens_per_s"], "refill_tokens_per_s": f["tokens_per_s"],
        "speedup": f["tokens_per_s"] / s["tokens_per_s"],
        "static_forwards": s["forwards"], "refill_forwards": f["forwards"],
        "host_syncs_per_step": max(s["host_syncs_per_step"], f["host_syncs_per_step"]),
        "latent_kv_fraction": ref["fraction"], "kv_bytes_per_token_layer": {"full": ref["full"], "latent": ref["latent"]},
        "tiny_latent_kv_fraction": tiny["latent"] / tiny["full"],
        "tiny_cache_bytes_match_plan": tiny == planned,
        "identical_tokens": s["responses"] == f["responses"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "setting": {"hidden": a.hidden, "layers": a.layers, "experts": a.experts, "null_experts": a.null_experts,
                    "topk": a.topk, "vocab": a.vocab, "prompts": a.prompts, "prompt_len": a.prompt_len,
                    "slots": a.slots, "limit": a.limit, "sigma": a.sigma, "threads": a.threads,
                    "mean_length": sum(lengths) / len(lengths)},
    }


def main(argv=None) -> int:
    res = run(parse(argv))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
