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

import numpy as np
import torch

from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from zeda_megatron import assumptions


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
        assumed = assumptions.current()
        if assumed is not None and not self.drop_and_pad:
            tokens_per_local_expert = self.assumed_splits(routing_map.shape[0], assumed)
        return tokens_per_local_expert

    def assumed_splits(self, tokens: int, assumed) -> np.ndarray:
        """Without data (the rehearsal, :mod:`zeda_megatron.assumptions`): the host sizes the
        routing would give when every rank routes ``tokens`` tokens, the assumed share of slots is
        real and those rows spread evenly over the experts. Returns the rows per local expert."""
        rows = assumed.real_rows(tokens, self.config.moe_router_topk)
        ep, tp, n_local = self.ep_size, self.tp_size, self.num_local_experts
        to_rank = assumptions.even_split(rows, ep)  # rows this rank sends to each EP rank
        mine = to_rank[self.ep_rank]  # ... and receives from each rank of the TP x EP group
        self.num_out_tokens = rows
        self.input_splits = np.array(to_rank)
        self.output_splits = np.array([mine] * ep)
        self.output_splits_tp = np.array([mine * ep] * tp)
        per_expert = assumptions.even_split(mine, n_local)
        # host arrays, as megatron-core has them after its device-to-host copy (tensors made here would
        # be fake, and their values unreadable, under the rehearsal's FakeTensorMode)
        self.num_global_tokens_per_local_expert = np.array([per_expert] * (tp * ep), dtype=np.int64)
        chunks = np.arange(self.num_experts * tp)
        self.sort_input_by_local_experts = chunks.reshape(-1, n_local).T.ravel()
        self.restore_output_by_local_experts = chunks.reshape(n_local, -1).T.ravel()
        return np.array([n * tp * ep for n in per_expert], dtype=np.int64)

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
        if assumptions.current() is not None:  # the assumed sizes are host values already
            return tokens_per_expert
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        self._count_rows(permutated_local_input_tokens.shape[0])
        return super().token_dispatch(permutated_local_input_tokens, permuted_probs)

    def combine_postprocess(self, permutated_local_input_tokens):
        out = super().combine_postprocess(permutated_local_input_tokens)
        # megatron-core keeps the forward's routing probabilities and map on the dispatcher until the
        # next forward; under activation recompute the probabilities hold the recomputed layer's
        # autograd graph (its input and that input's gradient) through the rest of the backward
        # and the optimizer step. Nothing reads them after the combine.
        self.probs = None
        self.routing_map = None
        return out


class NullAwareAllGatherDispatcher(_RowCounter, MoEAllGatherTokenDispatcher):
    """AllGather works with fewer than K real slots per row as is; every token row is gathered."""

    def __init__(self, *args, pg_collection=None, **kwargs):
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        self._init_counter(pg_collection)

    def token_dispatch(self, hidden_states, probs):
        self._count_rows(hidden_states.shape[0])
        return super().token_dispatch(hidden_states, probs)
