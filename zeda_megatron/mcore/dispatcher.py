"""Token dispatchers that move only real-expert assignments.

With null experts a token holds between 0 and K real assignments. megatron-core's dropless
AlltoAll dispatcher assumes exactly K (``num_out_tokens = T * K``), which would make its
permutation emit rows for null slots and break the all-to-all split sizes. The subclass sizes the
permutation by the real assignments instead, the same dynamic-size path megatron-core takes under a
capacity factor (one host sync before the first permutation). The AllGather dispatcher already
permutes by the routing map; its subclass only adds the counter.

Both count ``stat_rows_sent``: the rows this rank feeds into the dispatch collective.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


class _RowCounter:
    def _init_counter(self):
        self.stat_rows_sent = torch.zeros((), dtype=torch.int64)

    def reset_routing_stats(self):
        self.stat_rows_sent.zero_()


class NullAwareAlltoAllDispatcher(_RowCounter, MoEAlltoAllTokenDispatcher):
    def __init__(self, *args, dynamic_rows: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.dynamic_rows = dynamic_rows  # False (Z = 0): stock static T*K sizing, no extra sync
        self._init_counter()

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_local_expert = super().preprocess(routing_map)
        if self.dynamic_rows and not self.drop_and_pad:
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_local_expert

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        self.stat_rows_sent += permutated_local_input_tokens.shape[0]
        return super().token_dispatch(permutated_local_input_tokens, permuted_probs)


class NullAwareAllGatherDispatcher(_RowCounter, MoEAllGatherTokenDispatcher):
    """AllGather works with fewer than K real slots per row as is; every token row is gathered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_counter()

    def token_dispatch(self, hidden_states, probs):
        self.stat_rows_sent += hidden_states.shape[0]
        return super().token_dispatch(hidden_states, probs)
