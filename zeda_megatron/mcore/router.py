"""A megatron-core TopKRouter that scores E real + Z null experts and hands back only the real part.

Everything megatron-core's router does (softmax / sigmoid with expert bias, group-limited top-k,
scaling factor, z-loss, the stock aux losses, router replay, fused kernels on GPU) runs unchanged
over E+Z columns: the router is built with a shallow copy of the config whose ``num_moe_experts``
is E+Z. The rest of the MoE layer (dispatcher, experts, EP sharding) keeps E.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_tokens_per_expert_and_token_count,
    router_gating_linear,
)
from megatron.core.transformer.moe.router import TopKRouter

from zeda_megatron.mcore.config import GROUP_LOSS_NAME, NullExpertSettings
from zeda_megatron.routing import drop_null_columns, group_balance_loss


class NullExpertRouter(TopKRouter):
    """TopKRouter over E+Z experts; ``forward`` returns probs/routing_map with the E real columns.

    Expert bias (sigmoid routers): ``expert_bias`` and ``local_tokens_per_expert`` keep shape [E],
    so megatron-core's built-in bias update (finalize_model_grads) balances the real experts among
    themselves only; the null experts' bias lives in ``null_expert_bias`` [Z] and is never updated
    by it (the group balance loss sets the null share instead).

    Padding (``padding_mask`` True at pads, as megatron-core's MoE layer passes it): pad tokens are
    not dispatched at all (their routing row is cleared: no expert FLOPs, no all-to-all rows, their
    routed output is zero), and never reach the counters, the group loss or the expert-bias counts.

    Counters (no host sync; read with :meth:`routing_stats`): routed tokens, null slots, real
    assignments, accumulated over forwards until :meth:`reset_routing_stats`. They count the
    non-pad tokens this rank routes, so that summing them over ALL ranks (TP x CP x EP x DP; each
    layer lives on one PP stage) counts every token exactly once: under sequence parallelism each
    TP rank routes its own s/TP slice; with TP > 1 and sequence parallelism off (e.g. generation,
    where every TP rank routes the same tokens) only TP rank 0 counts.

    Group loss under TP x CP: each rank's loss is its additive share (its tokens' scores, with
    expert counts and the token total reduced over TP x CP), so the logged per-rank values sum over
    TP x CP to the layer's loss and their gradients sum (finalize_model_grads) to its gradient.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer=False, *, null: NullExpertSettings):
        self.null = null
        self._model_config = config  # the model's config (sequence_parallel may be toggled on it)
        self.num_real = config.num_moe_experts
        self.num_null = null.num_null_experts
        router_config = copy.copy(config)  # shallow copy: no __post_init__ re-validation
        router_config.num_moe_experts = self.num_real + self.num_null
        super().__init__(config=router_config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        if self.enable_expert_bias and self.num_null:
            device = self.expert_bias.device
            self.register_buffer("expert_bias", torch.zeros(self.num_real, dtype=torch.float32, device=device))
            self.register_buffer(
                "local_tokens_per_expert",
                torch.zeros(self.num_real, dtype=torch.float32, device=device),
                persistent=False,
            )
            self.register_buffer("null_expert_bias", torch.zeros(self.num_null, dtype=torch.float32, device=device))
        for name in ("stat_tokens", "stat_null_slots", "stat_real_assignments"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=self.weight.device), persistent=False)

    # ---- routing -------------------------------------------------------------------------------
    def gating(self, input):
        if not self.num_null:
            return super().gating(input)
        # Real and null logits come from two GEMMs so that the real logits are bit-identical to
        # the original router's (a GEMM's rounding depends on its shape); the router GEMM is tiny.
        if self.weight.device.type == "cpu":  # as Router.gating: CPU-initialised weights move
            self.weight.data = self.weight.data.to(device=torch.cuda.current_device())
        if self.bias is not None and self.bias.device.type == "cpu":
            self.bias.data = self.bias.data.to(device=torch.cuda.current_device())
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        e = self.num_real
        bias = (None, None) if self.bias is None else (self.bias[:e], self.bias[e:])
        real = router_gating_linear(input, self.weight[:e], bias[0], router_dtype)
        if self.null.mask_null_experts:
            null = real.new_full((*real.shape[:-1], self.num_null), float("-inf"))
        else:
            null = router_gating_linear(input, self.weight[e:], bias[1], router_dtype)
        return torch.cat([real, null], dim=-1)

    @contextlib.contextmanager
    def _full_expert_bias(self):
        """During routing, expose the [E+Z] bias that top-k selection needs."""
        real = self.expert_bias
        if real is None or not self.num_null:
            yield
            return
        null = self.null_expert_bias.float()
        if self.null.mask_null_experts:
            null = torch.full_like(null, float("-inf"))
        self._buffers["expert_bias"] = torch.cat([real.float(), null])
        try:
            yield
        finally:
            self._buffers["expert_bias"] = real

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        # Count real experts only, into the [E] buffer the built-in bias update reads. (Also fixes
        # megatron-core 0.19.2's missing unsqueeze on the padding mask.)
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.unsqueeze(-1)
                self.local_tokens_per_expert += routing_map[:, : self.num_real].sum(dim=0)

    def is_aux_loss_enabled(self) -> bool:
        return super().is_aux_loss_enabled() or self.get_aux_loss_coeff(GROUP_LOSS_NAME) > 0

    def _apply_group_loss(self, probs, logits, padding_mask):
        coeff = self.get_aux_loss_coeff(GROUP_LOSS_NAME)
        if coeff == 0 or not (self.training and torch.is_grad_enabled()):
            return probs
        routing_map, scores = compute_routing_scores_for_aux_loss(
            logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
            padding_mask=padding_mask,
        )
        tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk,
            with_padding_mask=padding_mask is not None,
        )
        loss = group_balance_loss(
            scores, routing_map, num_real=self.num_real, topk=self.topk,
            zero_weight=self.null.null_weight, coeff=coeff,
            tokens_per_expert=tokens_per_expert, num_tokens=total_tokens,
        )
        # calculate_per_token_loss scales the loss by valid_token_count * |TP x CP|. megatron-core
        # passes this rank's own valid tokens, which differ between TP ranks when pads are
        # unevenly spread (right padding puts them in the last sequence shards): the same loss
        # share then gets a different weight per rank. The group's mean count weighs every share
        # alike, so the gradient equals TP = 1's whatever the layout.
        del local_tokens
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, loss, "grouped_load_balancing_loss", self.tp_cp_group,
            valid_token_count=total_tokens / self.tp_cp_group.size(),
        )

    def routing(self, logits, padding_mask=None):
        with self._full_expert_bias():
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        flat_mask = padding_mask.reshape(-1) if padding_mask is not None else None
        probs = self._apply_group_loss(probs, logits.view(-1, self.num_real + self.num_null), flat_mask)
        probs, routing_map, null_slots = drop_null_columns(probs, routing_map, self.num_real)
        if flat_mask is not None:  # pads are not dispatched: no expert work, zero routed output
            valid = ~flat_mask.unsqueeze(-1)
            routing_map = routing_map & valid
            probs = probs * valid
            null_slots = null_slots * valid.squeeze(-1)
        if self._counts_tokens():
            with torch.no_grad():
                self.stat_tokens += routing_map.shape[0] if flat_mask is None else (~flat_mask).sum()
                self.stat_null_slots += null_slots.sum()
                self.stat_real_assignments += routing_map.sum()
        return probs, routing_map

    def _counts_tokens(self) -> bool:
        """False on TP ranks > 0 when every TP rank routes the same tokens (TP > 1 without
        sequence parallelism), so that counters summed over TP count each token once."""
        tp = self.tp_group
        return self._model_config.sequence_parallel or tp is None or tp.size() == 1 or tp.rank() == 0

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _maintain_float32_expert_bias(self):
        super()._maintain_float32_expert_bias()
        null = getattr(self, "null_expert_bias", None)
        if null is not None and null.dtype != torch.float32:
            null.data = null.data.to(torch.float32)

    def full_expert_bias(self) -> torch.Tensor | None:
        """The [E+Z] selection bias (real then null), e.g. for export as e_score_correction_bias."""
        if self.expert_bias is None:
            return None
        if not self.num_null:
            return self.expert_bias.float()
        return torch.cat([self.expert_bias.float(), self.null_expert_bias.float()])

    def reset_routing_stats(self) -> None:
        for name in ("stat_tokens", "stat_null_slots", "stat_real_assignments"):
            getattr(self, name).zero_()

    def routing_stats(self) -> dict:
        tokens = int(self.stat_tokens)
        null_slots = int(self.stat_null_slots)
        slots = tokens * self.topk
        return {
            "tokens": tokens,
            "null_slots": null_slots,
            "real_assignments": int(self.stat_real_assignments),
            "null_share": null_slots / slots if slots else 0.0,
        }
