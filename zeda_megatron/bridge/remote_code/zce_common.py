"""Shared by the shipped PlusPlus modeling files (needs only torch; ``zeda_routing`` is
zeda_megatron/routing.py, copied next to it at export)."""

import torch


def num_zce(config) -> int:
    nums = getattr(config, "zce_nums", None) or [0]
    types = getattr(config, "zce_types", None) or ["zero"]
    if any(t != "zero" for t in types):
        raise ValueError(f"zce_types={types}: only 'zero' experts are implemented here")
    if len(set(nums)) != 1:
        raise ValueError(f"zce_nums={nums}: one null-expert count for every MoE layer is supported")
    return int(nums[0])


def combine_real_experts(x, experts, weights, index, num_real):
    """sum over the chosen slots of weight * expert(x); slots on null experts (index >= num_real)
    are skipped: they contribute exactly zero and cost nothing."""
    out = torch.zeros_like(x)
    for e in torch.unique(index).tolist():
        if e >= num_real:
            continue
        tok, slot = torch.where(index == e)
        out.index_add_(0, tok, experts[e](x[tok]) * weights[tok, slot, None])
    return out
