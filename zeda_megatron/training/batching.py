"""Deterministic, resumable micro-batches: padded, or packed (stage 1, ``data.packing``).

**Order.** Epoch ``e`` visits the dataset in a seeded permutation. The data of step ``t`` depends only
on ``(seed, t)`` (and the dataset): a run resumed at step ``t`` sees what an uninterrupted run would,
and every data-parallel layout with the same global batch sees the same global batch. A step's
global batch is ``G = micro_batch_size * num_microbatches * dp_size`` consecutive *rows* of the order;
DP rank ``r`` takes the ``r``-th contiguous slice and splits it into micro-batches.

**Padded** (``packing`` off; stage 2 prompts always): a row is one sample padded on the right to
``S = seq_length``; a micro-batch is ``[micro_batch_size, S]``.

**Packed** (stage 1 with ``packing`` on): a row is a *bin* of ``S`` positions holding several whole
documents one after the other (best-fit-decreasing over windows of :data:`PACK_WINDOW` documents of
the epoch's permutation; the bins of a window are then shuffled, seeded), the rest of the bin padded.
A micro-batch concatenates its ``micro_batch_size`` bins into one ``thd`` sequence
``[1, micro_batch_size * S]`` with megatron's ``PackedSeqParams`` (``cu_seqlens`` at every document
boundary and at each bin's padding, which is a segment of its own): attention stays inside a
document and ``position_ids`` restart at 0 for each (megatron applies RoPE per ``cu_seqlens``
segment), so a document's loss is what it would be alone. A document longer than ``S + 1`` ids is
cut (its first ``S`` positions are kept).

Micro-batch dicts: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ``padding_mask`` (+
``prompt_length`` padded, + ``packed_seq_params`` and ``cu_seqlens`` packed). Tensors are on the CPU;
the step moves them to the model's device (:func:`zeda_megatron.training.step.to_device`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

IGNORE_INDEX = -100  # the label of a position that is not trained (megatron's and torch's convention)
PACK_WINDOW = 4096  # documents per best-fit window (larger: fuller bins, longer planning)
SEED_STRIDE = 1_000_003  # a prime: seed * SEED_STRIDE + offset gives each (run seed, epoch/step) its own seed
MAX_SEED = 2**63 - 1  # torch.Generator seeds are signed 64-bit


# ---- order -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((int(seed) * SEED_STRIDE + int(epoch)) % MAX_SEED)
    return torch.randperm(n, generator=gen)


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices of the global samples ``[start, start+count)`` of the seeded order."""
    out = []
    for g in range(start, start + count):
        epoch, pos = divmod(g, n)
        out.append(int(_epoch_order(n, seed, epoch)[pos]))
    return out


def step_rows(step: int, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int) -> list[range]:
    """Global row numbers of this DP rank's micro-batches at ``step``."""
    per_rank = micro_batch_size * num_microbatches
    g0 = step * per_rank * dp_size + dp_rank * per_rank
    return [range(g0 + m * micro_batch_size, g0 + (m + 1) * micro_batch_size) for m in range(num_microbatches)]


def step_indices(n: int, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int,
                 seed: int, step: int) -> list[list[int]]:
    """Dataset indices of this DP rank's (padded) micro-batches at ``step`` (0-based)."""
    return [sample_indices(n, seed, r.start, len(r))
            for r in step_rows(step, micro_batch_size, num_microbatches, dp_rank, dp_size)]


# ---- packing -----------------------------------------------------------------------------------------
def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of positions into ``sizes``) of total size <= ``capacity``: items by decreasing
    size, each into the fullest bin it fits (a new bin when none). Deterministic."""
    order = np.argsort(-np.asarray(sizes, dtype=np.int64), kind="stable")
    free = np.zeros(capacity + 1, dtype=np.int64)  # number of open bins with exactly r free positions
    by_free: dict[int, list[int]] = {}
    bins: list[list[int]] = []
    for i in order.tolist():
        s = int(sizes[i])
        hit = np.flatnonzero(free[s:])
        if hit.size:
            r = s + int(hit[0])
            b = by_free[r].pop()
            free[r] -= 1
        else:
            r = capacity
            b = len(bins)
            bins.append([])
        bins[b].append(i)
        r -= s
        free[r] += 1
        by_free.setdefault(r, []).append(b)
    return bins


class PackPlan:
    """The bins of one epoch: ``docs[starts[k]:starts[k+1]]`` are the documents of bin ``k``."""

    def __init__(self, positions: np.ndarray, seq_length: int, seed: int, epoch: int, window: int = PACK_WINDOW):
        n = len(positions)
        perm = _epoch_order(n, seed, epoch).numpy()
        dtype = np.int64 if n > np.iinfo(np.int32).max else np.int32
        docs: list[np.ndarray] = []  # one array per window (few, small objects)
        sizes: list[np.ndarray] = []
        for w0 in range(0, n, window):
            idx = perm[w0: w0 + window]
            bins = best_fit_decreasing(positions[idx], seq_length)
            rng = np.random.default_rng([int(seed), int(epoch), w0, 7])
            shuffled = [bins[k] for k in rng.permutation(len(bins)).tolist()]
            docs.append(idx[np.fromiter((i for b in shuffled for i in b), dtype=np.int64, count=len(idx))].astype(dtype))
            sizes.append(np.fromiter((len(b) for b in shuffled), dtype=np.int64, count=len(shuffled)))
        self.docs = np.concatenate(docs)
        self.starts = np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def bin(self, k: int) -> np.ndarray:
        return self.docs[self.starts[k]: self.starts[k + 1]]


class PackedRows:
    """Global packed rows (bins) over epochs: row ``g`` -> the document indices of its bin."""

    def __init__(self, dataset, seed: int, window: int = PACK_WINDOW):
        self.dataset, self.seed, self.window = dataset, int(seed), window
        self.positions = dataset.positions()
        self.seq_length = int(dataset.seq_length)
        self._counts: list[int] = []  # bins per epoch, as planned so far
        self._plans: dict[int, PackPlan] = {}

    def plan(self, epoch: int) -> PackPlan:
        p = self._plans.get(epoch)
        if p is None:
            p = PackPlan(self.positions, self.seq_length, self.seed, epoch, self.window)
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = p
        return p

    def locate(self, g: int) -> tuple[int, int]:
        epoch = 0
        while True:
            if epoch == len(self._counts):
                self._counts.append(len(self.plan(epoch)))
            if g < self._counts[epoch]:
                return epoch, g
            g -= self._counts[epoch]
            epoch += 1

    def row(self, g: int) -> np.ndarray:
        epoch, k = self.locate(g)
        return self.plan(epoch).bin(k)


def pack_documents(dataset, bins: list, seq_length: int | None = None, pad_id: int | None = None) -> dict:
    """One packed micro-batch (``[1, len(bins) * S]``, thd) from bins of document indices."""
    from megatron.core.packed_seq_params import PackedSeqParams

    S = int(seq_length or dataset.seq_length)
    pad = dataset.pad_id if pad_id is None else pad_id
    T = len(bins) * S
    tokens = torch.full((T,), pad, dtype=torch.long)
    labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(T, dtype=torch.long)
    padding = torch.ones(T, dtype=torch.bool)
    cu = [0]
    for row, docs in enumerate(bins):
        off, end = row * S, (row + 1) * S
        for d in docs:
            ids, mask = dataset.document(int(d))
            ids, mask = torch.from_numpy(np.asarray(ids, dtype=np.int64)), torch.from_numpy(np.asarray(mask, dtype=bool))
            m = min(len(ids) - 1, S)
            if off + m > end:
                raise ValueError(f"bin {row} overflows seq_length={S}")
            tokens[off: off + m] = ids[:m]
            labels[off: off + m] = torch.where(mask[1: m + 1], ids[1: m + 1], IGNORE_INDEX)
            position_ids[off: off + m] = torch.arange(m)
            padding[off: off + m] = False
            off += m
            cu.append(off)
        if off < end:  # the bin's padding: a segment of its own
            position_ids[off:end] = torch.arange(end - off)
            cu.append(end)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return {
        "tokens": tokens[None], "labels": labels[None], "loss_mask": (labels != IGNORE_INDEX).float()[None],
        "position_ids": position_ids[None], "padding_mask": padding[None], "cu_seqlens": cu_seqlens,
        "packed_seq_params": params,
    }


# ---- batches -----------------------------------------------------------------------------------------
def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def pad_fraction(batches) -> float:
    """Share of positions that are padding over micro-batches (``padding_mask``)."""
    pad = tot = 0
    for mb in batches:
        pad += int(mb["padding_mask"].sum())
        tot += mb["padding_mask"].numel()
    return pad / max(tot, 1)


def iterate_batches(dataset, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int,
                    seed: int, start_step: int = 0, max_steps: int | None = None,
                    packing: bool | None = None) -> Iterator[list[dict]]:
    """Yield, for steps ``start_step, start_step+1, ...`` (until ``max_steps`` if given), the list of
    this DP rank's ``num_microbatches`` micro-batches (see the module doc). ``packing``: None follows
    ``dataset.packing`` (set by ``build_dataset`` from ``data.packing``)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} out of range for dp_size={dp_size}")
    if micro_batch_size < 1 or num_microbatches < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} and num_microbatches={num_microbatches} must be >= 1")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    if packing is None:
        packing = bool(getattr(dataset, "packing", False))
    rows = PackedRows(dataset, seed) if packing else None
    step = int(start_step)
    while max_steps is None or step < max_steps:
        if packing:
            yield [pack_documents(dataset, [rows.row(g) for g in r])
                   for r in step_rows(step, micro_batch_size, num_microbatches, dp_rank, dp_size)]
        else:
            yield [collate([dataset[i] for i in mb])
                   for mb in step_indices(n, micro_batch_size, num_microbatches, dp_rank, dp_size, seed, step)]
        step += 1


def prompts_of(batch: dict, repeat: int = 1) -> list[list[int]]:
    """The prompt token ids of a (prompt) micro-batch, each repeated ``repeat`` times in a row
    (``stage.samples_per_prompt``), ready for sampling."""
    out = []
    for row, n in zip(batch["tokens"], batch["prompt_length"]):
        out.extend([row[: int(n)].tolist()] * repeat)
    return out
