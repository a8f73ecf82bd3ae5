"""Token dispatchers that move only real-expert assignments.

With null experts a token holds between 0 and K real assignments (and a pad token none: the router
clears pad rows). megatron-core's dropless AlltoAll dispatcher assumes exactly K
(``num_out_tokens = T * K``), which would make its permutation emit rows for null slots and break
the all-to-all split sizes. The subclass sizes the permutation by the real assignments instead, the
same dynamic-size path megatron-core takes under a capacity factor (one host sync before the first
permutation). The AllGather dispatcher already permutes by the routing map; its subclass only adds
the counter.

Both count ``stat_rows_sent``: the rows this rank feeds into the dispatch collective (under
sequence parallelism each TP rank its own tokens; with TP > 1 and sequence parallelism off only TP
rank 0 counts, so the sum over all ranks counts each row once).
"""

from __future__ import annotations

import torch

from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


class _RowCounter:
    def _init_counter(self, pg_collection):
        self.stat_rows_sent = torch.zeros((), dtype=torch.int64)
        self._attn_tp_group = pg_collection.tp  # the dispatcher's own tp_group is expert-TP

    def reset_routing_stats(self):
        self.stat_rows_sent.zero_()

    def _count_rows(self, rows: int) -> None:
        tp = self._attn_tp_group
        if self.config.sequence_parallel or tp is None or tp.size() == 1 or tp.rank() == 0:
            self.stat_rows_sent += rows


class NullAwareAlltoAllDispatcher(_RowCounter, MoEAlltoAllTokenDispatcher):
    def __init__(self, *args, dynamic_rows: bool = True, pg_collection=None, **kwargs):
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        # False (Z = 0, no padding mask): stock static T*K sizing, no extra sync. The layer sets it
        # per forward.
        self.dynamic_rows = dynamic_rows
        self._init_counter(pg_collection)

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_local_expert = super().preprocess(routing_map)
        if self.dynamic_rows and not self.drop_and_pad:
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_local_expert

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        self._count_rows(permutated_local_input_tokens.shape[0])
        return super().token_dispatch(permutated_local_input_tokens, permuted_probs)


class NullAwareAllGatherDispatcher(_RowCounter, MoEAllGatherTokenDispatcher):
    """AllGather works with fewer than K real slots per row as is; every token row is gathered."""

    def __init__(self, *args, pg_collection=None, **kwargs):
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        self._init_counter(pg_collection)

    def token_dispatch(self, hidden_states, probs):
        self._count_rows(hidden_states.shape[0])
        return super().token_dispatch(hidden_states, probs)
