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

    def reset_routing_stats(self) -> None:
        self.router.reset_routing_stats()
        self.token_dispatcher.reset_routing_stats()

    def routing_stats(self) -> dict:
        """Counters since the last reset: tokens, null_slots, real_assignments, null_share,
        rows_sent (rows this rank fed into the dispatch collective)."""
        return {**self.router.routing_stats(), "rows_sent": int(self.token_dispatcher.stat_rows_sent)}
