"""Benchmark: null-expert MoE layer vs megatron-core's stock MoELayer, forward + backward.

For target null-slot shares 0, 0.25, 0.5 and 0.75 the null-expert layer (same E, K and hidden
sizes, Z null experts) is timed against the stock layer in the same run; the table gives the time
ratio and the rows sent through the dispatcher. Null shares are set by shifting the null logits
(the router's input carries a constant feature; the null rows' weight on it is bisected).

    python tools/bench_moe_layer.py                  # CPU or one GPU, EP=1
    torchrun --nproc_per_node 2 tools/bench_moe_layer.py --ep 2   # expert parallel

A benchmark, not a test: it prints ratios measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16, help="E real experts")
    p.add_argument("--null-experts", type=int, default=16, help="Z null experts")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert FFN hidden size")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--shares", default="0,0.25,0.5,0.75")
    return p.parse_args()


def build(args, null):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig

    from zeda_megatron.mcore.specs import null_moe_spec
    from zeda_megatron.platform import cpu_config_overrides, on_cpu

    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, num_attention_heads=4,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type=args.dispatcher, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, moe_router_dtype="fp32", expert_model_parallel_size=args.ep,
        bf16=not on_cpu(), params_dtype=torch.float32 if on_cpu() else torch.bfloat16,
        **({"moe_grouped_gemm": True} | cpu_config_overrides()),
    )
    spec = get_moe_module_spec(use_te=not on_cpu(), num_experts=args.experts, moe_grouped_gemm=config.moe_grouped_gemm)
    layer = (null_moe_spec(spec, null) if null is not None else spec)(config=config, layer_number=1)
    return layer.to(torch.cuda.current_device())


def set_null_share(layer, x, args, target):
    """Bisect the null rows' weight on the constant input feature until the null share hits target."""
    w = layer.router.weight
    tokens = x.view(-1, x.shape[-1]).float()

    def share(c):
        with torch.no_grad():
            w[args.experts:, 0] = c
            logits = tokens @ w.float().t()
            return (logits.topk(args.topk, dim=-1).indices >= args.experts).float().mean().item()

    lo, hi = -50.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < target else (lo, mid)
    return share(hi if abs(share(hi) - target) < abs(share(lo) - target) else lo)


def time_layer(layer, x, args):
    layer.train()
    times = []
    for i in range(args.warmup + args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        xi = x.detach().requires_grad_(True)
        out, _ = layer(xi)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    args = parse()
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.mcore.config import NullExpertSettings

    init_parallel(ep=args.ep)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    torch.manual_seed(1234 + (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0))
    dev = torch.cuda.current_device()
    x = torch.randn(args.tokens, 1, args.hidden, device=dev)
    x[..., 0] = 1.0  # constant feature the null-share knob acts on
    stock = build(args, None)
    t_stock = time_layer(stock, x.to(stock.router.weight.dtype), args)
    rows_stock = args.tokens * args.topk
    lines = [f"E={args.experts} Z={args.null_experts} K={args.topk} hidden={args.hidden} ffn={args.ffn} "
             f"tokens/rank={args.tokens} dispatcher={args.dispatcher} EP={args.ep} device={'cpu' if str(dev) == 'cpu' else torch.cuda.get_device_name()}",
             f"stock MoELayer: {t_stock * 1e3:.1f} ms fwd+bwd, {rows_stock} rows sent",
             "",
             "| target null share | measured | time (ms) | time / stock | rows sent | rows / stock |",
             "|---|---|---|---|---|---|"]
    figures = {"stock_ms": t_stock * 1e3, "stock_rows": rows_stock, "points": []}
    null = NullExpertSettings(args.null_experts)
    layer = build(args, null)
    with torch.no_grad():
        layer.router.weight[: args.experts].copy_(stock.router.weight)
        for a, b in zip(layer.experts.parameters(), stock.experts.parameters()):
            a.copy_(b)
    for target in [float(s) for s in args.shares.split(",")]:
        measured = set_null_share(layer, x, args, target)
        layer.reset_routing_stats()
        t = time_layer(layer, x.to(layer.router.weight.dtype), args)
        rows = layer.routing_stats()["rows_sent"] // (args.warmup + args.iters)
        lines.append(f"| {target:.2f} | {measured:.3f} | {t * 1e3:.1f} | {t / t_stock:.2f} | {rows} | {rows / rows_stock:.2f} |")
        figures["points"].append({"target_null_share": target, "null_share": measured, "ms": t * 1e3,
                                  "time_ratio": t / t_stock, "rows_sent": rows, "rows_ratio": rows / rows_stock})
    if rank0:
        print("\n".join(lines), flush=True)
        print(json.dumps(figures), flush=True)  # the figures, one JSON line (the benchmarks' convention)
    destroy_parallel()


if __name__ == "__main__":
    main()
