"""Routing metrics of a step over the whole model: null share per layer and overall, expert FLOPs
removed, the group balance loss.

Every token is counted once over TP x EP x PP x DP: the null-expert layer's counters are per rank
and count this rank's own non-pad tokens (under sequence parallelism each TP rank routes a different
slice; without it only TP rank 0 counts), so they are summed over all ranks. The group loss each
rank logs is its tokens' additive share (counts and token totals already reduced over TP): summed
over TP, averaged over (DP replica, layer) pairs. Pads are never counted (the router gets the
padding mask). One host all-reduce per metric group.
"""

from __future__ import annotations

import torch

from zeda_megatron.distributed import all_reduce_host, comm_device


def null_metrics(engine, reset: bool = True) -> dict:
    """Null share per layer and overall (all stages, all DP replicas), expert FLOPs removed."""
    from zeda_megatron.mcore.specs import routing_stats

    n_layers = engine.config.num_layers
    stats = routing_stats(engine.student, reset=reset)
    t = torch.zeros(n_layers, 2, dtype=torch.float64)
    for number, s in stats["layers"].items():
        t[number - 1, 0] += s["null_slots"]
        t[number - 1, 1] += s["null_slots"] + s["real_assignments"]
    t = all_reduce_host(t)
    per_layer = {i + 1: (t[i, 0] / t[i, 1]).item() for i in range(n_layers) if t[i, 1] > 0}
    share = (t[:, 0].sum() / t[:, 1].sum().clamp_min(1)).item()
    cfg = engine.config
    routed = cfg.moe_router_topk * cfg.moe_ffn_hidden_size
    shared = cfg.moe_shared_expert_intermediate_size or 0
    return {
        "null_share": share, "null_share_per_layer": per_layer,
        "null_slots": float(t[:, 0].sum()), "routed_slots": float(t[:, 1].sum()),
        "expert_flops_removed": share,  # routed expert slots (the reference release's measure)
        "expert_flops_removed_incl_shared": share * routed / (routed + shared),
    }


def group_loss(engine, num_microbatches: int, reset: bool = True) -> float:
    """Mean group balance loss (per MoE layer and micro-batch) from megatron-core's metrics tracker.

    Each TP rank's logged value is its tokens' share of the loss (the scores are summed over its
    sequence slice, the counts are TP-global), so the values of all TP ranks are summed; the
    (replica, layer) pairs are counted on TP rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    entry = get_moe_metrics_tracker().metrics.get("grouped_load_balancing_loss")
    t = torch.zeros(2, dtype=torch.float64, device=comm_device())
    if entry is not None:
        values = entry.values.detach().double().to(t.device)
        t[0] = values.sum()
        if ps.get_tensor_model_parallel_rank() == 0:
            t[1] = (values != 0).sum()
        if reset:
            entry.values.zero_()
    t = all_reduce_host(t)
    # t[0]: sum over replicas, layers and micro-batches; t[1]: (replica, MoE layer) pairs seen
    return (t[0] / (t[1] * num_microbatches)).item() if t[1] else 0.0
