"""KV-cached rollouts for a megatron-core GPTModel under the training layout (TP, EP, PP, DP).

    from zeda_megatron.training.offload import offloaded
    from zeda_megatron.training.rollout import sample

    with offloaded(ddp, optimizer):                       # optional: free grads + optimizer state
        r = sample(student, prompt_batches, max_new_tokens=512, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(seed))
    train_step(engine, r.batches, replay=r.replay)        # contract batch dicts + router replay

How it runs
-----------
* KV cache: megatron-core's ``StaticInferenceContext`` passed to ``GPTModel.forward`` (the probe
  found it exact on CPU, MLA included). One prefill over the common prompt prefix, then one token
  per forward: O(L) attention per token, no [b, L, L] mask (attention is causal; decode steps attend
  to the whole cache). megatron-core's engines/controllers are not used: the static engine sets a
  process-wide ``InferenceMode`` and never unsets it, its generation loop moves tensors with
  ``.cuda()``, the dynamic engine needs CUDA pinned memory, and none of them records routing or
  keeps per-rank lockstep for our EP/DP layout. Only the last position's logits are computed (a
  ``GPTModel.forward(output_processor=...)`` over the last hidden state), gathered over TP.
* Layout: the model is the training model itself (DDP/Float16 wrappers are unwrapped). Sequence
  parallelism is switched off while decoding (``set_model_to_sequence_parallel``; one-token steps
  cannot be split over TP) and restored afterwards. Pipeline stages are driven by a plain
  recv -> forward -> send loop per step (the sampled token is broadcast from the last stage), so all
  stages of a pipeline step together. Every rank runs the same number of forwards: a rank whose rows
  are all finished keeps feeding a one-token dummy until all ranks are done (EP all-to-alls and PP
  sends pair up), decided by one host all-reduce per step.
* Padding/sampling (contract): prompts right-padded; decoding starts at the shortest prompt's end;
  where a longer prompt continues its token is forced. Per-row stop at EOS or ``max_new_tokens``
  sampled tokens; temperature (0 = greedy) and top-p; the uniform draws come from ``generator`` on
  every rank alike (one [b] draw per step), so every rank's generator stays in step.
* Router replay: when the student's routers have megatron-core's ``RouterReplay``
  (``moe_enable_routing_replay``), every forward records each MoE layer's top-k (prefill and decode
  steps) and the records are assembled per layer into the training forward's token order
  ([s, b] flattened s-major, this TP rank's sequence slice under SP). The training forward replays
  exactly the experts that chose the sampled tokens; no second forward is needed, and numerical
  differences between cached decoding and a full forward can never flip a replayed choice.
* MoE inference options: ``transformer_impl='inference_optimized'`` is refused
  (:func:`check_inference_settings`): megatron-core's inference-optimised layer rejects gated (SwiGLU)
  MLPs and swaps its own dispatcher in while ``InferenceMode`` is active, which would bypass the
  null-aware dispatcher. Sampling runs the training layer as is; it checks that every MoE layer's
  dispatcher is still the null-aware one, and leaves the routing counters as they were.

Memory: the grad buffers and optimizer state can leave the device while sampling
(:mod:`zeda_megatron.training.offload`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zeda_megatron.distributed import all_reduce_host, comm_device


# ---- model access ------------------------------------------------------------------------------------
def unwrap(model):
    """The GPTModel inside DDP / Float16Module / wrapper modules (anything with ``.module``)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def moe_routers(model) -> list:
    """The model's TopKRouters in construction (= layer) order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in unwrap(model).modules() if isinstance(m, TopKRouter)]


def check_inference_settings(model) -> None:
    """Refuse megatron-core inference options that conflict with the null-expert layer."""
    config = unwrap(model).config
    if getattr(config, "transformer_impl", None) == "inference_optimized":
        raise ValueError(
            "transformer_impl='inference_optimized' cannot sample with these models: megatron-core's "
            "inference-optimised MoE rejects gated (SwiGLU) experts and installs its own token dispatcher "
            "while InferenceMode is active, bypassing the null-aware one; keep the training implementation"
        )
    if getattr(config, "flash_decode", False) and comm_device().type == "cpu":
        raise ValueError("flash_decode needs CUDA kernels; turn it off on CPU")
    from zeda_megatron.mcore.dispatcher import NullAwareAllGatherDispatcher, NullAwareAlltoAllDispatcher
    from zeda_megatron.mcore.moe_layer import NullExpertMoELayer

    for m in unwrap(model).modules():
        if isinstance(m, NullExpertMoELayer) and not isinstance(
            m.token_dispatcher, (NullAwareAlltoAllDispatcher, NullAwareAllGatherDispatcher)
        ):
            raise RuntimeError(f"MoE layer {m.layer_number} lost its null-aware dispatcher "
                               f"({type(m.token_dispatcher).__name__})")


@contextlib.contextmanager
def _routing_counters_kept(model):
    """Sampling forwards do not count in the null-share/rows-sent counters read after training."""
    from zeda_megatron.mcore.specs import moe_layers

    saved = []
    for layer in moe_layers(unwrap(model)):
        bufs = [getattr(layer.router, n) for n in ("stat_tokens", "stat_null_slots", "stat_real_assignments")]
        bufs.append(layer.token_dispatcher.stat_rows_sent)
        saved.append((bufs, [b.clone() for b in bufs]))
    try:
        yield
    finally:
        for bufs, vals in saved:
            for b, v in zip(bufs, vals):
                b.copy_(v)


@contextlib.contextmanager
def decoding_mode(model):
    """Eval mode and sequence parallelism off for the duration (both restored)."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    gpt = unwrap(model)
    was_training, sp = gpt.training, bool(gpt.config.sequence_parallel)
    gpt.eval()
    if sp:
        set_model_to_sequence_parallel(gpt, False)
    try:
        yield gpt
    finally:
        if sp:
            set_model_to_sequence_parallel(gpt, True)
        gpt.train(was_training)


# ---- token choice -----------------------------------------------------------------------------------
def choose_tokens(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """Next tokens [b] from full-vocabulary logits [b, V]: argmax when ``temperature <= 0``, else
    inverse-CDF sampling with the uniforms ``u`` [b] from softmax(logits / T) restricted to the
    top-p nucleus (the smallest prefix of the sorted distribution whose mass reaches ``top_p``)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    index = None
    if top_p < 1.0:
        probs, index = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    x = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, x, right=True).clamp_max(cdf.shape[-1] - 1)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)


# ---- one forward through the pipeline -----------------------------------------------------------------
def _last_logits(hidden_states, output_layer, output_weight, **_):
    """output_processor: logits of the last position only, full vocabulary on every TP rank."""
    logits, _ = output_layer(hidden_states[-1:], weight=output_weight, runtime_gather_output=True)
    return logits[0].float()  # [b, V]


class _Pipeline:
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

    def forward(self, tokens: torch.Tensor, start: int, ctx=None) -> torch.Tensor | None:
        """Run tokens [b, s] at positions start..start+s-1; last stage returns logits [b, V]."""
        b, s = tokens.shape
        pos = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        if not self.first:
            buf = torch.empty(s, b, self.hidden, dtype=self.dtype, device=self.device)
            dist.recv(buf, src=self.prev)
            self.gpt.set_input_tensor(buf)
        out = self.gpt(tokens, pos, None, inference_context=ctx,
                       output_processor=_last_logits if self.last else None)
        if ctx is not None:
            ctx.sequence_len_offset += s
        if not self.last:
            dist.send(out.contiguous(), dst=self.next)
            return None
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.pp > 1:
            dist.broadcast(t, src=self.last_rank, group=self.group)
        return t


# ---- sampling -------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """What :func:`sample` returns.

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
    """

    batches: list
    replay: list | None
    logprobs: list
    responses: list
    forwards: int = 0
    prompt_lengths: list = field(default_factory=list)


def _draw(generator, b: int, temperature: float) -> torch.Tensor | None:
    if temperature <= 0:
        return None
    return torch.rand(b, generator=generator)


def _all_done(local: bool) -> bool:
    if not dist.is_initialized():
        return local
    return bool(all_reduce_host(torch.tensor([1 if local else 0]), op=dist.ReduceOp.MIN).item())


def _generate(pipe: _Pipeline, prompts, routers, *, max_new_tokens, eos_id, pad_id, temperature, top_p,
              generator, use_cache, on_token=None):
    """One decode batch. Returns (seq [b, T], sampled [b, T] bool, logp [b, T], per-router records
    [fed, b, k], number of real positions fed, forwards)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if b == 0 or int(plen.min()) == 0:
        raise ValueError("every prompt needs at least one token (add BOS)")
    start, total = int(plen.min()), int(plen.max()) + max_new_tokens
    seq = torch.full((b, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    sampled = torch.zeros(b, total, dtype=torch.bool)
    logp = torch.zeros(b, total, dtype=torch.float32)
    gen = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    records = [_Records() for _ in routers]
    ctx = StaticInferenceContext(b, total) if use_cache else None
    dev = pipe.device
    seq_dev = seq.to(dev)

    def record(last_only=False):
        for rec, r in zip(records, routers):
            idx = r.router_replay.get_recorded_indices()
            idx = idx.view(-1, b, idx.shape[-1])
            rec.add(idx[-1:] if last_only else idx)

    logits = pipe.forward(seq_dev[:, :start], 0, ctx)
    if ctx is not None:
        ctx.enable_decode_mode()
    forwards, t = 1, start
    if routers:
        record()
    while True:
        local_done = bool(done.all()) or t >= total
        if not local_done:
            u = _draw(generator, b, temperature)
            out = torch.zeros(b, 2, dtype=torch.float64, device=dev)
            if pipe.last:
                nxt = choose_tokens(logits, u, temperature, top_p)
                lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
                out[:, 0], out[:, 1] = nxt.double(), lp.double()
            out = pipe.broadcast(out).cpu()
            nxt, lp = out[:, 0].long(), out[:, 1].float()
            forced = t < plen
            new = ~forced & ~done
            tok = torch.where(forced, seq[:, t], torch.where(new, nxt, torch.full_like(nxt, pad_id)))
            seq[:, t] = tok
            seq_dev[:, t] = tok.to(dev)
            sampled[:, t] = new
            logp[:, t] = torch.where(new, lp, torch.zeros_like(lp))
            gen += new.long()
            done |= new & ((nxt == eos_id) | (gen >= max_new_tokens))
            t += 1
            local_done = bool(done.all()) or t >= total
            if on_token is not None:
                on_token(t - start)
        if _all_done(local_done):
            break
        if local_done:  # keep stepping with the others: a one-token dummy, no cache, nothing kept
            pipe.forward(torch.full((1, 1), pad_id, dtype=torch.long, device=dev), 0, None)
        elif use_cache:
            logits = pipe.forward(seq_dev[:, t - 1: t], t - 1, ctx)
            if routers:
                record()
        else:  # prefix recompute (reference and benchmark baseline)
            logits = pipe.forward(seq_dev[:, :t], 0, None)
            if routers:
                record(last_only=True)  # the newest position; the others were recorded before
        forwards += 1
    return seq[:, :t], sampled[:, :t], logp[:, :t], [rec.result() for rec in records], forwards


class _Records:
    """Top-k indices per position, kept on the device as int32 and moved to the host in blocks
    (no device sync per decode step)."""

    BLOCK = 512

    def __init__(self):
        self.device, self.host = [], []

    def add(self, idx: torch.Tensor) -> None:
        self.device.append(idx.to(torch.int32))
        if len(self.device) >= self.BLOCK:
            self._flush()

    def _flush(self):
        if self.device:
            self.host.append(torch.cat(self.device, 0).cpu())
            self.device = []

    def result(self) -> torch.Tensor:
        self._flush()
        return torch.cat(self.host, 0).long()


def _replay_fill(router, k: int) -> torch.Tensor:
    """Top-k indices for positions no forward saw (length padding): null experts when there are
    enough of them (no expert work), else experts 0..k-1."""
    num_real = getattr(router, "num_real", None)
    num_null = getattr(router, "num_null", 0) or 0
    if num_real is not None and num_null >= k:
        return torch.arange(num_real, num_real + k)
    return torch.arange(k)


def _training_order(rec: torch.Tensor, router, length: int, sp: bool) -> torch.Tensor:
    """[fed, b, k] records -> [S_local * b, k] in the training forward's token order."""
    from megatron.core import parallel_state as ps

    fed, b, k = rec.shape
    full = _replay_fill(router, k).view(1, 1, k).expand(length, b, k).clone()
    full[:fed] = rec
    if sp:
        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = length // tp
        full = full[r * n: (r + 1) * n]
    return full.reshape(-1, k).contiguous()


@torch.no_grad()
def sample(model, prompt_batches, *, max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
           top_p: float = 1.0, generator: torch.Generator | None = None, tp_multiple: int | None = None,
           record_routing: bool | None = None, use_cache: bool = True, on_token=None) -> Rollout:
    """Sample a response to every prompt with the model as it is laid out for training.

    model: the student (GPTModel, or DDP/Float16Module/any wrapper with ``.module``) on this rank.
    prompt_batches: micro-batches of prompts (lists of token ids, BOS included as the caller wants).
        Each micro-batch is one decode batch; every rank must pass the same number of micro-batches
        (all ranks step together).
    max_new_tokens: sampled tokens per row at most (EOS included).
    temperature: 0 = greedy. top_p: nucleus mass (1 = off). generator: a CPU torch.Generator (needed
        when temperature > 0), seeded alike on the ranks of one model replica.
    tp_multiple: the training sequence length is padded to a multiple of it (default: the TP size
        when the model trains with sequence parallelism, else 1).
    record_routing: record each MoE layer's routing for router replay (default: when the routers
        have megatron-core's RouterReplay, i.e. ``moe_enable_routing_replay``).
    use_cache: False recomputes the whole prefix for every token (reference / benchmark baseline).
    on_token: optional callback, called with the number of positions decoded so far in the current
        micro-batch after each decode step (progress, benchmarks).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    if temperature > 0 and generator is None:
        raise ValueError("sampling with temperature > 0 needs a torch.Generator")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_inference_settings(model)
    gpt = unwrap(model)
    sp_training = bool(gpt.config.sequence_parallel)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp_multiple is None:
        tp_multiple = tp if sp_training else 1
    routers = [r for r in moe_routers(gpt) if getattr(r, "router_replay", None) is not None]
    if record_routing is None:
        record_routing = bool(routers)
    if record_routing and (not routers or len(routers) != len(moe_routers(gpt))):
        raise ValueError("record_routing needs RouterReplay on every MoE router: build the student with "
                         "moe_enable_routing_replay=True")
    routers = routers if record_routing else []
    results = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_routing_counters_kept(gpt))
        stack.enter_context(decoding_mode(gpt))
        for r in routers:
            r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        stack.callback(lambda: [(r.router_replay.clear_router_replay_action(), r.router_replay.clear_indices())
                                for r in routers])
        pipe = _Pipeline(gpt)
        try:
            for prompts in prompt_batches:
                results.append(_generate(pipe, prompts, routers, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                         pad_id=pad_id, temperature=temperature, top_p=top_p,
                                         generator=generator, use_cache=use_cache, on_token=on_token))
        finally:
            if not pipe.first:
                gpt.set_input_tensor(None)
    # common training length S: every fed position (L - 1), padded to the TP multiple
    longest = max(seq.shape[1] for seq, *_ in results) - 1
    S = -(-max(longest, 1) // tp_multiple) * tp_multiple
    batches, replay, logprobs, responses, lengths = [], [] if routers else None, [], [], []
    forwards = 0
    for prompts, (seq, sampled, logp, records, n) in zip(prompt_batches, results):
        forwards += n
        b, L = seq.shape
        full = torch.full((b, S + 1), pad_id, dtype=torch.long)
        full[:, :L] = seq
        smask = torch.zeros(b, S + 1, dtype=torch.bool)
        smask[:, :L] = sampled
        lp = torch.zeros(b, S + 1)
        lp[:, :L] = logp
        plen = torch.tensor([len(p) for p in prompts])
        # prompt + response, less the last token: it has no label, nothing is trained from its output,
        # and sampling never fed it (so it has no sampling-time routing to replay)
        real_len = plen + smask.sum(1) - 1
        idx = torch.arange(S)
        loss_mask = smask[:, 1:].float()
        batches.append({
            "tokens": full[:, :-1].contiguous(), "labels": full[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": idx.unsqueeze(0).expand(b, S).contiguous(),
            "padding_mask": idx.unsqueeze(0) >= real_len.unsqueeze(1),
        })
        logprobs.append(lp[:, 1:].contiguous())
        responses.append([full[i, 1:][smask[i, 1:]].tolist() for i in range(b)])
        lengths.append(plen.tolist())
        if routers:
            replay.append([_training_order(rec[: L - 1], r, S, sp_training)
                           for rec, r in zip(records, routers)])
    return Rollout(batches, replay, logprobs, responses, forwards, lengths)
