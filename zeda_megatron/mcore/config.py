"""Null-expert settings and their validation against a megatron-core TransformerConfig."""

from __future__ import annotations

from dataclasses import dataclass

GROUP_LOSS_NAME = "grouped_aux_loss"  # the reference release's --moe-router-load-balancing-type
SUPPORTED_DISPATCHERS = ("alltoall", "allgather")


@dataclass(frozen=True)
class NullExpertSettings:
    """What ZEDA adds to every MoE layer.

    num_null_experts: Z parameter-free experts whose output is exactly zero.
    null_weight: w in the group balance loss; its equilibrium null-slot share is wZ/(E+wZ).
        The loss is on when ``"grouped_aux_loss"`` is among ``moe_router_load_balancing_type``
        (its coefficient from ``moe_aux_loss_coeff``), exactly like megatron-core's own aux losses.
    mask_null_experts: route as if the null experts did not exist (null logits at -inf): the layer
        is then the original static layer (the reference release's ``use_zce_mask``).
    """

    num_null_experts: int = 0
    null_weight: float = 1.0
    mask_null_experts: bool = False

    def __post_init__(self):
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            raise ValueError(
                f"num_null_experts must be an integer >= 0, got {self.num_null_experts!r} "
                "(use 0 for the original layer)"
            )
        if self.null_weight <= 0:
            raise ValueError(f"null_weight (w of the group loss) must be > 0, got {self.null_weight}")


def load_balancing_types(config) -> list[str]:
    kind = config.moe_router_load_balancing_type
    return list(kind) if isinstance(kind, (list, tuple)) else [kind]


def validate(config, settings: NullExpertSettings, ep_size: int = 1) -> None:
    """Fail early, naming the setting and the fix, for configurations the null-expert layer
    cannot run."""
    num_real = config.num_moe_experts
    if num_real is None or num_real < 1:
        raise ValueError("num_moe_experts must be set (>= 1) for a null-expert MoE layer")
    total = num_real + settings.num_null_experts
    topk = config.moe_router_topk
    if topk > total:
        raise ValueError(
            f"moe_router_topk={topk} exceeds the E+Z={num_real}+{settings.num_null_experts}="
            f"{total} experts the router scores; lower topk or add experts"
        )
    if settings.mask_null_experts and topk > num_real:
        raise ValueError(
            f"mask_null_experts needs moe_router_topk={topk} <= E={num_real} real experts"
        )
    if num_real % ep_size:
        raise ValueError(
            f"expert parallel size {ep_size} must divide num_moe_experts={num_real} (real experts "
            "only: null experts have no weights and live on no rank); change expert_model_parallel_size"
        )
    groups = config.moe_router_num_groups
    if groups and total % groups:
        raise ValueError(
            f"moe_router_num_groups={groups} must divide E+Z={total} (group-limited top-k runs over "
            "real and null experts); pick Z so that groups divide E+Z, or change the group count"
        )
    if groups and total // groups < topk // config.moe_router_group_topk:
        raise ValueError(
            f"moe_router_num_groups={groups}: each group of E+Z={total} holds {total // groups} experts "
            f"but group-limited top-k takes topk/group_topk={topk // config.moe_router_group_topk} per group"
        )
    dispatcher = config.moe_token_dispatcher_type
    if dispatcher not in SUPPORTED_DISPATCHERS:
        raise ValueError(
            f"moe_token_dispatcher_type={dispatcher!r} is not supported with null experts; use one "
            f"of {SUPPORTED_DISPATCHERS} (alltoall sends only real assignments)"
        )
    if settings.num_null_experts and (
        config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity
    ):
        raise ValueError(
            "moe_expert_capacity_factor / moe_pad_expert_input_to_capacity assume K real slots per "
            "token; null experts already make the layer dropless-with-fewer-rows: unset them"
        )
    if settings.num_null_experts and config.moe_router_padding_for_quantization:
        raise ValueError("moe_router_padding_for_quantization is not supported with null experts")
    if settings.num_null_experts and config.moe_router_load_balancing_type == "sinkhorn":
        raise ValueError("sinkhorn routing is not supported with null experts; use aux losses")
    if GROUP_LOSS_NAME in load_balancing_types(config) and settings.num_null_experts == 0:
        raise ValueError(
            f"moe_router_load_balancing_type includes {GROUP_LOSS_NAME!r} but num_null_experts=0: "
            "the group loss balances real against null experts; add null experts or drop it"
        )
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        raise ValueError(
            f"moe_router_score_function={config.moe_router_score_function!r}: null experts support "
            "'softmax' and 'sigmoid'"
        )
