"""Stage 2 (on-policy distillation): the live student samples, the co-located teacher scores.

Sampling runs the same pipeline schedule forward-only, one new token per pass over the whole
prefix (no KV cache here: a single code path under any TP/EP/PP layout; training/rollout.py is the
KV-cached sampler). Prompts are RIGHT-padded, as in megatron-core's TextGenerationController:
decoding starts at the shortest prompt's end, and at a position still inside a longer prompt the
prompt token is forced instead of the sample. Attention is plain causal with position ids 0..n-1
(what RoPE uses); pads sit after each row's real tokens and are handed to the router as the
padding mask. Every forward is right-padded to a multiple of TP under sequence parallelism.

Because every sampling pass recomputes the full prefix, the routing that chose each sampled token
equals the routing of one forward over the final sequence: that forward records it with
megatron-core's RouterReplay, and the training forward replays it, so the router is trained on the
tokens it routed.

Everything is built on the model's device; the host syncs are one flag per pass (all ranks stop
together) and the sampled tokens' broadcast over the pipeline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zeda_megatron.distributed import all_reduce_host
from zeda_megatron.training.step import model_device, model_inputs, pad_batch, prepare_microbatches, run_schedule, seq_multiple


def right_pad(prompts: list[list[int]], pad_id: int, length: int, device=None):
    """[b, length] tokens with each prompt at the left, pads after it, and the prompt lengths [b]."""
    rows = [list(p)[:length] + [pad_id] * (length - min(len(p), length)) for p in prompts]
    lengths = [min(len(p), length) for p in prompts]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(lengths, dtype=torch.long, device=device))


def _logits_at(index: int):
    """collect_non_loss_data loss_func: the logits at position ``index``, full vocabulary."""

    def fn(output, non_loss_data=True):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        last = output[:, index, :].float()  # student logits (the teacher is off while sampling)
        if ps.get_tensor_model_parallel_world_size() > 1:
            last = gather_from_tensor_model_parallel_region(last)
        return last

    return fn


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    gdev = getattr(generator, "device", probs.device)
    if gdev.type != probs.device.type:  # a host generator: sample there (one copy per token)
        return torch.multinomial(probs.to(gdev), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _row_padding(real_len: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=real_len.device).unsqueeze(0) >= real_len.unsqueeze(1)


@torch.no_grad()
def sample(engine, prompt_batches: list[list[list[int]]], *, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, generator: torch.Generator):
    """Sample up to ``max_new_tokens`` tokens after every prompt. ``prompt_batches``: micro-batches of
    token-id lists.

    Returns per micro-batch dicts in the batch format, on the model's device, all of one length
    L-1 (L: the longest prompt + response on this rank): ``tokens``, ``labels`` (the next tokens),
    ``loss_mask`` (the sampled tokens, EOS included), ``position_ids`` (0..), ``padding_mask``
    (True after each row's own prompt + response)."""
    from megatron.core import parallel_state as ps

    device = model_device()
    mult = seq_multiple(engine.config)
    prompt_lens = [len(p) for mb in prompt_batches for p in mb]
    if min(prompt_lens) < 1:
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    capacity = max(prompt_lens) + max_new_tokens
    bufs, plens = zip(*(right_pad(mb, pad_id, capacity, device) for mb in prompt_batches))
    bufs, plens = list(bufs), list(plens)
    real_len = [p.clone() for p in plens]  # tokens that are real (prompt, forced or sampled) so far
    n_gen = [torch.zeros_like(p) for p in plens]
    done = [torch.zeros_like(p, dtype=torch.bool) for p in plens]
    gen_mask = [torch.zeros_like(b, dtype=torch.bool) for b in bufs]
    pos = min(prompt_lens)  # the next position to fill
    engine.wrapper.eval()
    engine.wrapper.teacher_enabled = False
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    try:
        while True:
            local_done = pos >= capacity or all(bool(d.all()) for d in done)
            if _all_ranks_done(local_done):
                break
            length = -(-pos // mult) * mult
            mbs = []
            for b, r in zip(bufs, real_len):
                rows = b.shape[0]
                mbs.append(pad_batch({
                    "tokens": b[:, :pos],
                    "position_ids": torch.arange(pos, device=device).unsqueeze(0).expand(rows, pos),
                    "padding_mask": _row_padding(r.clamp_max(pos), pos),
                }, length, pad_id))

            def forward_step(data_iterator, model, _index=pos - 1):
                args, kw = model_inputs(next(data_iterator))
                return model(*args, **kw), _logits_at(_index)

            out = run_schedule(engine, mbs, True, forward_step, seq_length=length, collect_non_loss_data=True)
            if local_done:
                continue  # this rank is finished; it only keeps the collectives paired
            for i in range(len(bufs)):
                rows = bufs[i].shape[0]
                nxt = _draw(out[i], temperature, generator) if last_stage else \
                    torch.zeros(rows, dtype=torch.long, device=device)
                nxt = _broadcast_from_last_stage(nxt)
                forced = pos < plens[i]
                sampled = ~forced & ~done[i]
                token = torch.where(forced, bufs[i][:, pos], torch.where(sampled, nxt, torch.full_like(nxt, pad_id)))
                bufs[i][:, pos] = token
                gen_mask[i][:, pos] = sampled
                real_len[i] = torch.where(forced | sampled, torch.full_like(real_len[i], pos + 1), real_len[i])
                n_gen[i] = n_gen[i] + sampled.long()
                done[i] = done[i] | (sampled & (nxt == eos_id)) | (n_gen[i] >= max_new_tokens)
            pos += 1
    finally:
        engine.wrapper.teacher_enabled = True
    end = max(int(r.max()) for r in real_len)  # one host read: the batches' length
    batches = []
    for b, g, r in zip(bufs, gen_mask, real_len):
        n = end - 1
        batches.append({
            "tokens": b[:, :n].clone(), "labels": b[:, 1:end].clone(),
            "loss_mask": g[:, 1:end].float(),  # label t is token t+1: trained where that one was sampled
            "position_ids": torch.arange(n, device=device).unsqueeze(0).expand(b.shape[0], n).contiguous(),
            "padding_mask": _row_padding(r - 1, n),  # row j's inputs are its own tokens[:real_len-1]
        })
    return batches


def _all_ranks_done(local_done: bool) -> bool:
    """Every rank must run the same number of sampling passes (EP all-to-alls, TP collectives and
    PP sends pair up across ranks): stop only when all of them are done."""
    return bool(all_reduce_host(torch.tensor([1 if local_done else 0]), op=dist.ReduceOp.MIN).item())


@torch.no_grad()
def record_routing(engine, batches, pad_id: int = 0):
    """Forward-only pass over the sampled sequences recording each MoE layer's top-k choices (the
    same preparation as :func:`~zeda_megatron.training.step.train_step`, so the replay lines up)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    recorded = []
    engine.wrapper.eval()
    engine.wrapper.teacher_enabled = False
    mbs = prepare_microbatches(batches, engine.config, pad_id=pad_id)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        def forward_step(data_iterator, model):
            args, kw = model_inputs(next(data_iterator))
            out = model(*args, **kw)
            recorded.append([t.clone() for t in RouterReplay.get_recorded_data()])
            return out, lambda output, non_loss_data=True: None

        run_schedule(engine, mbs, True, forward_step, seq_length=mbs[0]["tokens"].shape[1], collect_non_loss_data=True)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        engine.wrapper.teacher_enabled = True
    return recorded
