"""Sampled sequences -> the trainer's micro-batches and the routing it replays."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """What :func:`~zeda_megatron.training.rollout.sample` returns.

    batches: per micro-batch, the contract's batch dict: tokens [b, S], labels [b, S] (pad_id where
        not trained), loss_mask [b, S] float (1 on sampled tokens, EOS included), position_ids [b, S]
        (0..S-1), padding_mask [b, S] bool (True = pad; also each row's last token, which has no
        label: pads are not routed). S is common to all micro-batches and a multiple of
        ``tp_multiple``.
    replay: per micro-batch, per MoE layer of this rank (construction order, as
        ``RouterReplay.set_replay_data`` wants them) the top-k expert indices [S_local * b, topk] in the
        training forward's token order; None when the routers record nothing.
    logprobs: per micro-batch [b, S] float32: log p(label) under the sampling forward's logits
        (temperature 1, before top-p) where loss_mask is 1, else 0.
    responses: per micro-batch, per row, the sampled token ids (EOS included when emitted).
    forwards: number of model forwards this rank ran (equal on every rank).
    stats: the engine's counters (slot utilisation, tokens per forward, host syncs, ...).
    routing: per prompt (flattened order), per MoE layer of this rank, the top-k indices chosen at
        each fed position [len(prompt + response) - 1, k]; None when nothing is recorded.
    """

    batches: list
    replay: list | None
    logprobs: list
    responses: list
    forwards: int = 0
    prompt_lengths: list = field(default_factory=list)
    stats: object = None
    routing: list | None = None


def replay_fill(router, k: int) -> torch.Tensor:
    """Top-k indices for positions no forward saw (length padding): null experts when there are
    enough of them (no expert work), else experts 0..k-1."""
    num_real = getattr(router, "num_real", None)
    num_null = getattr(router, "num_null", 0) or 0
    if num_real is not None and num_null >= k:
        return torch.arange(num_real, num_real + k)
    return torch.arange(k)


def training_order(rows: list, router, length: int, sp: bool) -> torch.Tensor:
    """Per row the records [fed_i, k] -> [S_local * b, k] in the training forward's token order
    ([s, b] flattened s-major; this TP rank's sequence slice under sequence parallelism)."""
    from megatron.core import parallel_state as ps

    b, k = len(rows), rows[0].shape[-1]
    full = replay_fill(router, k).view(1, 1, k).expand(length, b, k).clone()
    for i, rec in enumerate(rows):
        full[: rec.shape[0], i] = rec
    if sp:
        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = length // tp
        full = full[r * n: (r + 1) * n]
    return full.reshape(-1, k).contiguous()


def build_rollout(prompt_batches, sequences: list, routing: dict | None, routers: list, *, pad_id: int,
                  tp_multiple: int, sp: bool) -> Rollout:
    """The trainer's view of the sampled ``sequences`` (in flattened prompt order), grouped as the
    caller's ``prompt_batches``."""
    # common training length S: every fed position (len - 1), padded to the TP multiple
    longest = max(len(s.tokens) for s in sequences) - 1
    S = -(-max(longest, 1) // tp_multiple) * tp_multiple
    batches, replay, logprobs, responses, lengths = [], [] if routing is not None else None, [], [], []
    it = iter(sequences)
    for prompts in prompt_batches:
        seqs = [next(it) for _ in prompts]
        b = len(seqs)
        full = torch.full((b, S + 1), pad_id, dtype=torch.long)
        smask = torch.zeros(b, S + 1, dtype=torch.bool)
        lp = torch.zeros(b, S + 1)
        for i, s in enumerate(seqs):
            n, p = len(s.tokens), len(s.prompt)
            full[i, :n] = torch.tensor(s.tokens, dtype=torch.long)
            smask[i, p:n] = True
            lp[i, p:n] = torch.tensor(s.logprobs, dtype=torch.float32)
        # prompt + response, less the last token: it has no label, nothing is trained from its output,
        # and sampling never fed it (so it has no sampling-time routing to replay)
        real_len = torch.tensor([len(s.tokens) - 1 for s in seqs])
        idx = torch.arange(S)
        batches.append({
            "tokens": full[:, :-1].contiguous(), "labels": full[:, 1:].contiguous(),
            "loss_mask": smask[:, 1:].float(), "position_ids": idx.unsqueeze(0).expand(b, S).contiguous(),
            "padding_mask": idx.unsqueeze(0) >= real_len.unsqueeze(1),
        })
        logprobs.append(lp[:, 1:].contiguous())
        responses.append([s.tokens[len(s.prompt):] for s in seqs])
        lengths.append([len(s.prompt) for s in seqs])
        if routing is not None:
            per_router = []
            for j, r in enumerate(routers):
                rows = [routing[s.index][j] for s in seqs]
                for s, rec in zip(seqs, rows):
                    if rec.shape[0] != len(s.tokens) - 1:
                        raise RuntimeError(f"routing of sequence {s.index}: {rec.shape[0]} positions recorded, "
                                           f"{len(s.tokens) - 1} fed")
                per_router.append(training_order(rows, r, S, sp))
            replay.append(per_router)
    per_sequence = None if routing is None else [routing[s.index] for s in sequences]
    return Rollout(batches, replay, logprobs, responses, prompt_lengths=lengths, routing=per_sequence)
