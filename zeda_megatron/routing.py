"""ZEDA routing in plain torch: top-k over real + null experts, null-slot dropping, group loss.

Nothing here imports megatron-core; these functions are the specification the Megatron-Core glue
(:mod:`zeda_megatron.mcore`) and the exported Hugging Face modeling code follow, and tests compare
both against them.

Notation: ``E`` real experts, ``Z`` null (zero-output, parameter-free) experts, ``K`` slots per
token (top-k, unchanged by adding null experts), ``T`` tokens, ``w`` the null-group weight of the
group balance loss.
"""

from __future__ import annotations

import torch

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def _check_select_args(num_experts, topk, score_function, expert_bias, num_groups, group_topk):
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk={topk} must be in [1, E+Z={num_experts}]")
    if expert_bias is not None and expert_bias.shape != (num_experts,):
        raise ValueError(
            f"expert_bias has shape {tuple(expert_bias.shape)}, expected ({num_experts},) = E+Z"
        )
    if (num_groups is None) != (group_topk is None):
        raise ValueError("num_groups and group_topk must be given together (group-limited top-k)")
    if num_groups is not None:
        if num_experts % num_groups:
            raise ValueError(
                f"num_groups={num_groups} must divide E+Z={num_experts} for group-limited top-k"
            )
        if not 1 <= group_topk <= num_groups or topk % group_topk:
            raise ValueError(
                f"group_topk={group_topk} must be in [1, num_groups={num_groups}] and divide "
                f"topk={topk}"
            )
        if num_experts // num_groups < topk // group_topk:
            raise ValueError(
                f"group-limited top-k takes topk/group_topk={topk // group_topk} experts per group, "
                f"but a group of E+Z={num_experts} split {num_groups} ways holds {num_experts // num_groups}"
            )


def topk_select(scores: torch.Tensor, topk: int, num_groups=None, group_topk=None):
    """Top-k over the last dim, optionally group-limited (DeepSeek-V3 style: keep the
    ``group_topk`` groups whose best ``topk // group_topk`` scores sum highest)."""
    if not group_topk:
        return torch.topk(scores, k=topk, dim=1, sorted=torch.is_grad_enabled())
    num_tokens, num_experts = scores.shape
    group_scores = scores.view(num_tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups).reshape(num_tokens, -1)
    )
    return torch.topk(scores.masked_fill(~score_mask.bool(), float("-inf")), k=topk, dim=-1)


def select_experts(
    logits: torch.Tensor,
    *,
    topk: int,
    score_function: str = "softmax",
    expert_bias: torch.Tensor | None = None,
    scaling_factor: float | None = None,
    normalize_topk: bool = True,
    num_groups: int | None = None,
    group_topk: int | None = None,
):
    """Top-k gate weights over all columns of ``logits`` [T, N] -> (weights [T, K], indices [T, K]).

    softmax: with ``normalize_topk`` the K chosen logits are softmaxed (= softmax over all, top-k,
    renormalise: HF ``norm_topk_prob=True``); without it the softmax over all N is kept as is.
    sigmoid: experts are chosen on ``sigmoid(logit) + expert_bias`` and weighed by the unbiased
    sigmoid, normalised over the K chosen when ``normalize_topk`` and K > 1.
    ``scaling_factor`` multiplies the weights last. Bad arguments raise ValueError naming the setting.
    """
    _check_select_args(logits.shape[-1], topk, score_function, expert_bias, num_groups, group_topk)
    if score_function == "softmax":
        if normalize_topk:
            chosen, idx = topk_select(logits, topk, num_groups, group_topk)
            weights = torch.softmax(chosen, dim=-1, dtype=torch.float32)
        else:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, idx = topk_select(scores, topk, num_groups, group_topk)
    else:
        scores = torch.sigmoid(logits.float())
        if expert_bias is not None:
            _, idx = topk_select(scores + expert_bias.float(), topk, num_groups, group_topk)
            weights = torch.gather(scores, 1, idx)
        else:
            weights, idx = topk_select(scores, topk, num_groups, group_topk)
        if normalize_topk and topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor:
        weights = weights * scaling_factor
    return weights.type_as(logits), idx


def drop_null_columns(probs_full: torch.Tensor, map_full: torch.Tensor, num_real: int):
    """Keep the E real columns of dense [T, E+Z] routing tensors, without renormalising.

    The probability mass a token gave to null slots is discarded: its MoE output shrinks by that
    mass (the reference release's semantics). Returns (probs [T, E], routing_map [T, E],
    null_slots [T] int64: how many of the token's K slots landed on null experts).
    """
    null_slots = map_full[:, num_real:].sum(dim=-1)
    return probs_full[:, :num_real].contiguous(), map_full[:, :num_real].contiguous(), null_slots


def route(logits: torch.Tensor, *, num_real: int, **select):
    """Route tokens over E real + Z null experts; return the real part.

    Args:
        logits: [T, E+Z] router logits, real experts first.
        num_real: E.
        select: :func:`select_experts`' keyword arguments, over all E+Z experts:
            topk: K slots per token, chosen among all E+Z experts.
            score_function: "softmax" (Qwen3-MoE) or "sigmoid" (GLM-4.7-Flash, with ``expert_bias``
                of shape [E+Z] used only to choose).
            scaling_factor: routed scaling factor applied after normalisation (GLM: 1.8).
            normalize_topk: normalise the weights over the K chosen slots, null slots included.
            num_groups, group_topk: group-limited top-k over E+Z (groups must divide E+Z).

    Returns:
        probs [T, E] (zero off the chosen real experts; rows sum to <= 1 * scaling when null slots
        were chosen), routing_map [T, E] bool, null_slots [T] int64.
    """
    _, num_experts = logits.shape
    if not 0 < num_real <= num_experts:
        raise ValueError(
            f"num_real={num_real} must be in [1, logits.shape[-1]={num_experts}] "
            "(logits hold E real then Z null expert columns)"
        )
    weights, idx = select_experts(logits, **select)
    probs_full = torch.zeros_like(logits).scatter(1, idx, weights)
    map_full = torch.zeros_like(logits, dtype=torch.int).scatter(1, idx, 1).bool()
    return drop_null_columns(probs_full, map_full, num_real)


def routing_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-token expert scores for balance losses: softmax over E+Z, or sigmoid normalised per row
    (the same scores megatron-core's aux losses use)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()  # >= fp32, as megatron-core
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")


def group_balance_loss(
    scores: torch.Tensor,
    routing_map_full: torch.Tensor,
    *,
    num_real: int,
    topk: int,
    zero_weight: float,
    coeff: float,
    tokens_per_expert: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """ZEDA's group auxiliary loss: balance the real group against the (weighted) null group.

        L_GA = coeff * (E + wZ) / (K T^2) * (F_E S_E / E + F_Z S_Z / (wZ))

    with F_E, F_Z the slots routed to real / null experts and S_E, S_Z the summed scores of each
    group. Its equilibrium has F_E/E = F_Z/(wZ), i.e. a null-slot share of wZ/(E+wZ); routing
    among the real experts is left unconstrained. Differentiable in ``scores``.

    Args:
        scores: [T, E+Z] routing scores (:func:`routing_scores`).
        routing_map_full: [T, E+Z] bool top-k map over all experts.
        tokens_per_expert, num_tokens: counts already reduced over a token-parallel group
            (megatron-core passes its TP x CP all-reduced counts); default: from this batch.
    """
    num_experts = scores.shape[-1]
    num_null = num_experts - num_real
    if num_null <= 0:
        raise ValueError(
            f"group_balance_loss needs null experts: scores have {num_experts} columns and "
            f"num_real={num_real}"
        )
    if zero_weight <= 0:
        raise ValueError(f"zero_weight (w) must be > 0, got {zero_weight}")
    if routing_map_full.shape != scores.shape:
        raise ValueError(
            f"routing_map_full shape {tuple(routing_map_full.shape)} != scores shape {tuple(scores.shape)}"
        )
    counts = routing_map_full.sum(dim=0).float() if tokens_per_expert is None else tokens_per_expert.float()
    total = scores.shape[0] if num_tokens is None else num_tokens
    f_real, f_null = counts[:num_real].sum(), counts[num_real:].sum()
    s_real, s_null = scores[:, :num_real].sum(), scores[:, num_real:].sum()
    wz = zero_weight * num_null
    return coeff * (num_real + wz) / (topk * total * total) * (f_real * s_real / num_real + f_null * s_null / wz)


def target_null_share(num_real: int, num_null: int, zero_weight: float) -> float:
    """Null-slot share at the group loss's equilibrium: wZ / (E + wZ)."""
    return zero_weight * num_null / (num_real + zero_weight * num_null)


def zero_weight_for_share(share: float, num_real: int, num_null: int) -> float:
    """The w that makes ``share`` the group loss's equilibrium null-slot share."""
    if not 0 < share < 1 or num_null <= 0:
        raise ValueError(f"target null share must be in (0, 1) with Z > 0, got {share} with Z={num_null}")
    return share * num_real / ((1 - share) * num_null)


def num_null_from_ratio(num_real: int, ratio: float) -> int:
    """Z from a ratio Z/E (e.g. 0.5 -> 32 null experts for E=64); must come out a whole number."""
    z = ratio * num_real
    if ratio < 0 or abs(z - round(z)) > 1e-9:
        raise ValueError(
            f"null ratio {ratio} times E={num_real} experts is {z}, not a whole number of null experts"
        )
    return int(round(z))
