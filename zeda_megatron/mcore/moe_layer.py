"""MoELayer with Z null experts: megatron-core's layer with the null-expert router and dispatcher."""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from zeda_megatron.mcore import config as null_config
from zeda_megatron.mcore.config import NullExpertSettings
from zeda_megatron.mcore.dispatcher import NullAwareAllGatherDispatcher, NullAwareAlltoAllDispatcher
from zeda_megatron.mcore.router import NullExpertRouter
from zeda_megatron.platform import check_cpu_config


class NullExpertMoELayer(MoELayer):
    """megatron-core MoELayer whose router scores E+Z experts; null slots never reach the
    dispatcher, so they cost no expert FLOPs and no all-to-all rows, and add exactly zero.

    ``submodules`` is the stock :class:`MoESubmodules`; a stock ``TopKRouter`` entry is replaced by
    :class:`NullExpertRouter` (a subclass of it given in the spec is kept). The shared expert, if
    any, is untouched. With Z = 0 the layer computes exactly what ``MoELayer`` computes.
    """

    def __init__(self, config, submodules: MoESubmodules | None = None, layer_number=None,
                 pg_collection=None, is_mtp_layer=False, name=None, *,
                 null: NullExpertSettings = NullExpertSettings()):
        pg_collection = pg_collection or get_default_pg_collection()
        null_config.validate(config, null, ep_size=pg_collection.ep.size())
        check_cpu_config(config)
        self.null = null
        router = submodules.router
        if router is TopKRouter:
            router = partial(NullExpertRouter, null=null)
        submodules = dataclasses.replace(submodules, router=router)
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        # MoELayer picks its dispatcher with a hard-coded if/elif (no builder hook): replace it.
        args = (self.num_local_experts, self.local_expert_indices)
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = NullAwareAlltoAllDispatcher(
                *args, config=self.config, pg_collection=pg_collection,
                dynamic_rows=null.num_null_experts > 0,
            )
        else:
            self.token_dispatcher = NullAwareAllGatherDispatcher(*args, config=self.config, pg_collection=pg_collection)
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        """MoELayer.forward; ``padding_mask`` [b, s] is True at pads (megatron-core's convention).

        Under sequence parallelism GPTModel scatters the mask over TP on the first pipeline stage
        only; a later stage may get the whole [b, s] mask for its [s/TP, b, h] hidden states, so it
        is cut to this TP rank's slice here."""
        if padding_mask is not None:
            padding_mask = self.local_padding_mask(padding_mask, hidden_states.shape[0])
        if isinstance(self.token_dispatcher, NullAwareAlltoAllDispatcher):
            # pads are never dispatched, so rows may be fewer than T*K even without null experts
            self.token_dispatcher.dynamic_rows = self.null.num_null_experts > 0 or padding_mask is not None
        return super().forward(hidden_states, intermediate_tensors, padding_mask=padding_mask)

    def local_padding_mask(self, padding_mask, seq_local: int):
        """This TP rank's [b, seq_local] slice of a [b, s] padding mask (or the mask itself when it
        already matches ``seq_local``)."""
        if padding_mask.shape[1] == seq_local:
            return padding_mask
        tp = self.attn_tp_group
        if self.config.sequence_parallel and padding_mask.shape[1] == seq_local * tp.size():
            rank = tp.rank()
            return padding_mask[:, rank * seq_local: (rank + 1) * seq_local]
        raise ValueError(
            f"padding_mask has {padding_mask.shape[1]} positions per sequence but the MoE layer's input "
            f"has {seq_local} (sequence_parallel={self.config.sequence_parallel}, TP={tp.size()})"
        )

    def reset_routing_stats(self) -> None:
        self.router.reset_routing_stats()
        self.token_dispatcher.reset_routing_stats()

    def routing_stats(self) -> dict:
        """Counters since the last reset: tokens, null_slots, real_assignments, null_share,
        rows_sent (rows this rank fed into the dispatch collective).

        Per-rank, not reduced: the non-pad tokens THIS rank routed (under sequence parallelism its
        s/TP slice). Summed over all ranks (TP x CP x EP x DP) they count each token once; with
        TP > 1 and sequence parallelism off, TP ranks > 0 report zeros."""
        return {**self.router.routing_stats(), "rows_sent": int(self.token_dispatcher.stat_rows_sent)}
