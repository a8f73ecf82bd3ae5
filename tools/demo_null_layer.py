"""Demonstration of the null-expert layer alone (no teacher, no checkpoint): a quick look at what
the layer does under expert parallelism.

Builds a small GLM-4.7-Flash-shaped megatron-core GPT model (MLA attention, first layer dense,
sigmoid router with expert bias and routed scaling, one shared expert) with Z = E/2 null experts
per MoE layer and the group balance loss set for a 50% null share, then trains it for a few steps
on a synthetic next-token task under expert parallelism. Each step prints the LM loss, the null-slot
share per layer and the rows the all-to-all moved compared with a stock layer (T*K).

    torchrun --nproc_per_node 2 tools/demo_null_layer.py          # EP=2 on CPU (gloo) or GPUs
    python tools/demo_null_layer.py --ep 1                        # one process
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=None, help="expert parallel size (default: world size)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--null-ratio", type=float, default=0.5)
    p.add_argument("--null-share", type=float, default=0.5, help="target null-slot share (sets w)")
    # The reference release uses 0.1 over hundreds of full-size steps; the demo is 150 tiny steps.
    p.add_argument("--group-loss-coeff", type=float, default=1.0)
    p.add_argument("--out", default="runs/demo/layer_demo.json")
    return p.parse_args()


def build_model(args):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import MLATransformerConfig

    from zeda_megatron.mcore.specs import gpt_block_spec, settings_from
    from zeda_megatron.platform import cpu_config_overrides
    from zeda_megatron.routing import num_null_from_ratio, zero_weight_for_share

    z = num_null_from_ratio(args.experts, args.null_ratio)
    w = zero_weight_for_share(args.null_share, args.experts, z)
    config = MLATransformerConfig(
        num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        qk_layernorm=True, rope_type="rope", normalization="RMSNorm",
        num_moe_experts=args.experts, moe_router_topk=4, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1],
        moe_shared_expert_intermediate_size=32, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0, moe_router_topk_scaling_factor=1.8,
        moe_router_load_balancing_type="grouped_aux_loss", moe_aux_loss_coeff=args.group_loss_coeff,
        moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32", expert_model_parallel_size=args.ep,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, **cpu_config_overrides(),
    )
    null = settings_from(args.experts, num_null_experts=z, null_weight=w)
    model = GPTModel(config, gpt_block_spec(config, null), vocab_size=64, max_sequence_length=32)
    return model.to(torch.cuda.current_device()), null


def batch(step, rank, device, bsz=8, seq=32, vocab=64):
    """Arithmetic progressions mod vocab: predictable after two tokens, so the LM loss falls."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    start = torch.randint(0, vocab, (bsz, 1), generator=g)
    stride = torch.randint(1, 5, (bsz, 1), generator=g)
    seqs = (start + stride * torch.arange(seq + 1)) % vocab
    return seqs[:, :-1].to(device), seqs[:, 1:].to(device)


def main():
    args = parse()
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.mcore.specs import routing_stats
    from zeda_megatron.routing import target_null_share

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.ep = args.ep or world
    init_parallel(ep=args.ep)
    rank = dist.get_rank()
    model, null = build_model(args)
    target = target_null_share(args.experts, null.num_null_experts, null.null_weight)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    device = torch.cuda.current_device()
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"[demo] world={world} EP={args.ep}: E={args.experts} real + Z={null.num_null_experts} null experts "
        f"per MoE layer, top-4, group loss w={null.null_weight:.2f} -> target null share {target:.2f}")
    history = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        tokens, labels = batch(step, rank, device)
        pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        model.train()
        loss = model(tokens, pos, attention_mask=None, labels=labels).float().mean()
        opt.zero_grad()
        loss.backward()
        # data-parallel gradient average (megatron marks expert weights allreduce=False: under
        # EP=world they have no replica to average with)
        for p in model.parameters():
            if p.grad is not None and getattr(p, "allreduce", True) and world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        stats = routing_stats(model, reset=True)
        shares = " ".join(f"L{n}:{s['null_share']:.2f}" for n, s in stats["layers"].items())
        stock_rows = stats["tokens"] * 4
        row = {"step": step, "loss": loss.item(), "null_share": stats["null_share"],
               "rows_sent": stats["rows_sent"], "stock_rows": stock_rows}
        history.append(row)
        if step == 1 or step % 5 == 0 or step == args.steps:
            log(f"[demo] step {step:3d}  loss {row['loss']:.3f}  null share {shares}  "
                f"a2a rows {stats['rows_sent']}/{stock_rows} (stock)  {time.time() - t0:.1f}s")
    if rank == 0:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        summary = {"target_null_share": target, "final": history[-1], "history": history}
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        final = history[-1]
        log(f"[demo] done: null share {history[0]['null_share']:.2f} -> {final['null_share']:.2f} "
            f"(target {target:.2f}); expert rows moved {final['rows_sent'] / final['stock_rows']:.0%} of stock; "
            f"summary in {args.out}")
    destroy_parallel()


if __name__ == "__main__":
    main()
