"""The decode loop: slots in, sampled sequences (tokens, log-probs, routing) out.

One step = one forward of every pipeline stage over the step's tokens (:class:`~.slots.StepPlan`,
flattened ``[1, T]``), the sampling of the slots whose prompt is cached, and ONE host
synchronisation: a single device-to-host copy of ``[sampled tokens, their log-probs, any rank has
work left]``. Everything else stays on the device or goes host-to-device without waiting: the
step's layout is one packed int64 copy, the uniforms of a prompt are copied in when it is admitted,
the "work left" flag is all-reduced on the device and read in that same copy, routing records are
copied out asynchronously in blocks.

All ranks step together: the loop runs until no rank has work, and a rank without work feeds one
filler token into its scratch slot, so that expert-parallel all-to-alls and pipeline sends pair up.
Pipeline stages receive the previous stage's ``[T, 1, hidden]`` (T is known on every stage: the
step's layout is the same), and the last stage broadcasts its sampled tokens to the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zeda_megatron import assumptions
from zeda_megatron.distributed import comm_device
from zeda_megatron.plan.memory import TOKEN_BUDGET
from zeda_megatron.training.rollout.kv_cache import SlotCache, StepInfo, cached_attention
from zeda_megatron.training.rollout.sampling import choose_tokens, prompt_uniforms
from zeda_megatron.training.rollout.slots import Slots, StepPlan


@dataclass
class EngineStats:
    """Counters of one run (this rank). ``slot_steps`` = slots x forwards; ``busy_slot_steps`` =
    (slot, step) pairs that fed a live sequence; ``real_tokens`` = tokens fed that belong to a
    sequence (prompt chunks + decode tokens)."""

    slots: int = 0
    forwards: int = 0
    filler_forwards: int = 0
    busy_slot_steps: int = 0
    real_tokens: int = 0
    sampled_tokens: int = 0
    host_syncs: int = 0
    seconds: float = 0.0
    cache_bytes: int = 0
    step_seconds: list = field(default_factory=list)  # wall time of each step (forward, sampling, host copy)

    @property
    def slot_utilisation(self) -> float:
        return self.busy_slot_steps / max(1, self.slots * self.forwards)

    @property
    def tokens_per_forward(self) -> float:
        return self.real_tokens / max(1, self.forwards)

    @property
    def host_syncs_per_step(self) -> float:
        return self.host_syncs / max(1, self.forwards)


def _logits_at(rows_s, rows_b):
    """output_processor: full-vocabulary fp32 logits of the hidden rows (rows_s, rows_b) only."""

    def proc(hidden_states, output_layer, output_weight, **_):
        if not rows_s.numel():  # nothing sampled this step (a filler, or prompts still prefilling)
            return None
        h = hidden_states[rows_s, rows_b].unsqueeze(1)  # [n, 1, hidden]
        logits, _ = output_layer(h, weight=output_weight, runtime_gather_output=True)
        return logits[:, 0].float()

    return proc


class Pipeline:
    """One forward through this rank's pipeline stage (plain recv -> forward -> send)."""

    def __init__(self, gpt):
        from megatron.core import parallel_state as ps

        self.gpt = gpt
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        if self.pp > 1:
            self.prev = ps.get_pipeline_model_parallel_prev_rank()
            self.next = ps.get_pipeline_model_parallel_next_rank()
            self.group = ps.get_pipeline_model_parallel_group()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        cfg = gpt.config
        self.hidden = cfg.hidden_size
        self.dtype = cfg.pipeline_dtype or cfg.params_dtype
        self.device = comm_device()

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, rows_s, rows_b) -> torch.Tensor | None:
        """ids/pos [b, s] on the device; the last stage returns the logits at (rows_s, rows_b) [n, V]."""
        b, s = ids.shape
        if not self.first:
            buf = torch.empty(s, b, self.hidden, dtype=self.dtype, device=self.device)
            dist.recv(buf, src=self.prev)
            self.gpt.set_input_tensor(buf)
        out = self.gpt(ids, pos, None, output_processor=_logits_at(rows_s, rows_b) if self.last else None)
        if not self.last:
            dist.send(out.contiguous(), dst=self.next)
            return None
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.pp > 1:
            dist.broadcast(t, src=self.last_rank, group=self.group)
        return t


class RoutingRecords:
    """Top-k indices recorded per forward, kept with the (sequence, position) of each row; copied to
    the host in blocks without waiting (pinned memory on CUDA: the next step's host copy orders
    after it)."""

    BLOCK = 256

    def __init__(self, routers):
        self.routers = routers
        self.pending: list = []  # per step: [per router idx [n, k] int16]
        self.host: list = []  # per block: [per router host tensor]
        self.seq: list = []
        self.pos: list = []

    def add(self, seq: list, pos: list, select: torch.Tensor | None = None) -> None:
        rows = []
        for r in self.routers:
            idx = r.router_replay.get_recorded_indices()
            idx = idx.reshape(-1, idx.shape[-1])
            rows.append((idx if select is None else idx[select]).to(torch.int16))
        self.pending.append(rows)
        self.seq.extend(seq)
        self.pos.extend(pos)
        if len(self.pending) >= self.BLOCK:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        block = []
        for j in range(len(self.routers)):
            dev = torch.cat([step[j] for step in self.pending], 0)
            if dev.is_cuda:
                host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                host.copy_(dev, non_blocking=True)
            else:
                host = dev.cpu()
            block.append(host)
        self.host.append(block)
        self.pending = []

    def per_sequence(self) -> dict:
        """{sequence index: [per router [positions, k] long, in position order]}."""
        self.flush()
        if any(t.is_pinned() for block in self.host for t in block):
            torch.cuda.synchronize()  # the last block's copy (once per rollout)
        if not self.host:
            return {}
        seq, pos = torch.tensor(self.seq, dtype=torch.long), torch.tensor(self.pos, dtype=torch.long)
        order = torch.argsort(seq * (int(pos.max()) + 1) + pos, stable=True)
        seq_sorted = seq[order]
        per_router = [torch.cat([block[j] for block in self.host], 0)[order].long() for j in range(len(self.routers))]
        out = {}
        ids, counts = torch.unique_consecutive(seq_sorted, return_counts=True)
        start = 0
        for s, n in zip(ids.tolist(), counts.tolist()):
            out[s] = [t[start:start + n] for t in per_router]
            start += n
        return out


class Engine:
    """Samples sequences in ``n_slots`` decode slots of the live model (see the module docstring).

    cached=False recomputes every slot's whole prefix at every step with the model's own attention
    (no cache): the reference the cached path is tested against; scheduling is the same.
    """

    def __init__(self, gpt, *, n_slots: int, length: int, eos_id: int, pad_id: int, temperature: float,
                 top_p: float, seed: int, routers: list, cached: bool = True, mla_cache: str = "latent",
                 refill: bool = True, token_budget: int = TOKEN_BUDGET):
        self.gpt, self.n_slots, self.length = gpt, n_slots, length
        self.eos_id, self.pad_id = eos_id, pad_id
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.cached, self.mla_cache, self.refill, self.token_budget = cached, mla_cache, refill, token_budget
        self.pipe = Pipeline(gpt)
        self.device = self.pipe.device
        self.records = RoutingRecords(routers) if routers else None
        self.stats = EngineStats(slots=n_slots)

    # -- host <-> device -------------------------------------------------------------------------
    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """The one blocking device-to-host copy of a step (counted)."""
        self.stats.host_syncs += 1
        return t.cpu()

    def _upload(self, values: list) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    # -- one step ---------------------------------------------------------------------------------
    def _cached_forward(self, plan: StepPlan, cache: SlotCache):
        """Feed the plan's tokens through the cached attention; returns (logits or None, meta)."""
        T, n = len(plan), len(plan.samples)
        flags = Slots.last_token_flags(plan)
        u_index = [slot * self.length + s.sampled for _, slot, s in plan.samples]
        singles_slots = [plan.slot[i] for i in plan.singles]
        meta = self._upload(plan.ids + plan.pos + plan.slot + plan.singles + [i for i, _, _ in plan.samples]
                            + u_index + flags)
        ids, pos, slot, singles, rows, u_idx, last = torch.split(meta, [T, T, T, len(plan.singles), n, n, n])
        cache.step = StepInfo(
            slot=slot, pos=pos, singles=singles, single_slot=slot[singles], single_len=pos[singles] + 1,
            single_max=max((plan.pos[i] + 1 for i in plan.singles), default=0),
            single_contiguous=singles_slots == list(range(len(singles_slots))), chunks=plan.chunks)
        logits = self.pipe.forward(ids.view(1, T), pos.view(1, T), rows, torch.zeros_like(rows))
        if self.records is not None and plan.rows:
            self.records.add(plan.seq, plan.pos)
        return logits, u_idx, last

    def _recompute_forward(self, plan: StepPlan):
        """Every busy slot's whole prefix, right-padded, through the model's own attention."""
        if not plan.rows:  # a filler step: one token, nothing sampled
            meta = self._upload([self.pad_id, 0])
            return self.pipe.forward(meta[:1].view(1, 1), meta[1:].view(1, 1), meta[:0], meta[:0]), None, None
        rows = plan.rows
        L = max(p0 + n for _, _, p0, n in rows)
        grid = [s.tokens[: p0 + n] + [self.pad_id] * (L - p0 - n) for _, s, p0, n in rows]
        row_of = {slot: r for r, (slot, *_) in enumerate(rows)}
        sample_rows = [row_of[slot] for _, slot, _ in plan.samples]
        sample_pos = [rows[r][2] + rows[r][3] - 1 for r in sample_rows]
        flags = Slots.last_token_flags(plan)
        u_index = [slot * self.length + s.sampled for _, slot, s in plan.samples]
        b, n = len(rows), len(plan.samples)
        select = [p * b + r for r, (_, _, p0, cnt) in enumerate(rows) for p in range(p0, p0 + cnt)]
        meta = self._upload([t for row in grid for t in row] + list(range(L)) + sample_pos + sample_rows
                            + u_index + flags + select)
        ids, pos, s_pos, s_row, u_idx, last, sel = torch.split(meta, [b * L, L, n, n, n, n, len(select)])
        logits = self.pipe.forward(ids.view(b, L), pos.view(1, L).expand(b, L), s_pos, s_row)
        if self.records is not None:  # the record is [L, b] s-major: keep each row's newly fed positions
            self.records.add([s.index for _, s, p0, cnt in rows for _ in range(cnt)],
                             [q for _, _, p0, cnt in rows for q in range(p0, p0 + cnt)], sel)
        return logits, u_idx, last

    def _sample(self, logits, plan: StepPlan, u_idx, last, uniforms, pending: int):
        """Tokens and log-probs of the plan's sampled rows + the all-reduced 'work left' flag, in one
        host copy. Returns (tokens, logprobs, more)."""
        n = len(plan.samples)
        packed = torch.zeros(2 * n + 1, dtype=torch.float64, device=self.device)
        if n:
            if self.pipe.last:
                u = uniforms.view(-1)[u_idx] if uniforms is not None else None
                tok = choose_tokens(logits, u, self.temperature, self.top_p)
                lp = torch.log_softmax(logits, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
                packed[:n], packed[n:2 * n] = tok.double(), lp.double()
            self.pipe.broadcast(packed[: 2 * n])
            done = (packed[:n] == float(self.eos_id)) | last.bool()
            packed[2 * n] = pending - done.sum()
        else:
            packed[2 * n] = pending
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = packed[2 * n:]
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        host = self._to_host(packed)
        assumed = assumptions.current()
        if assumed is not None:  # no data (the rehearsal): no EOS, stop after the assumed number of forwards
            more = assumed.sampler_steps is None or self.stats.forwards < assumed.sampler_steps
            return [self.eos_id + 1] * n, [0.0] * n, more
        return host[:n].long().tolist(), host[n:2 * n].float().tolist(), bool(host[2 * n] > 0)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, sequences: list, on_finished=None, every: int = 64) -> tuple[list, dict]:
        """Sample every sequence; returns (sequences in index order, routing per sequence index).

        on_finished: streaming instead: called on every rank, in lockstep, every ``every`` steps
        and once at the end with the sequences that ended since its last call (possibly none); the
        sequences are not kept."""
        import contextlib

        slots = Slots(sequences, self.n_slots, refill=self.refill, token_budget=self.token_budget,
                      keep_finished=on_finished is None)
        ended = []
        cache = SlotCache(self.n_slots, self.length)
        uniforms = None
        if self.temperature > 0 and self.pipe.last:
            uniforms = torch.zeros(self.n_slots + 1, self.length, device=self.device)
        t0 = time.perf_counter()
        ctx = cached_attention(self.gpt, cache, self.mla_cache) if self.cached else contextlib.nullcontext()
        with ctx:
            while True:
                t_step = time.perf_counter()
                for slot, seq in slots.admit():
                    if uniforms is not None:
                        uniforms[slot, : seq.limit] = prompt_uniforms(self.seed, seq.key, seq.limit).to(self.device)
                plan = slots.plan()
                pending = slots.busy + (1 if slots.queue else 0)
                if not len(plan):
                    plan = StepPlan(ids=[self.pad_id], pos=[0], slot=[self.n_slots], seq=[-1], singles=[0])
                    self.stats.filler_forwards += 1
                else:
                    self.stats.busy_slot_steps += len(plan.rows)
                    self.stats.real_tokens += len(plan)
                forward = self._cached_forward(plan, cache) if self.cached else self._recompute_forward(plan)
                logits, u_idx, last = forward[0], forward[1], forward[2]
                self.stats.forwards += 1
                tokens, logprobs, more = self._sample(logits, plan, u_idx, last, uniforms, pending)
                self.stats.sampled_tokens += len(tokens)
                if plan.rows:
                    ended += slots.advance(plan, tokens, logprobs, self.eos_id)
                self.stats.step_seconds.append(time.perf_counter() - t_step)
                if on_finished is not None and (not more or self.stats.forwards % every == 0):
                    on_finished(ended)
                    ended = []
                if not more:
                    break
        self.stats.seconds = time.perf_counter() - t0
        self.stats.cache_bytes = cache.bytes()
        routing = self.records.per_sequence() if self.records is not None else {}
        return sorted(slots.finished, key=lambda s: s.index), routing
