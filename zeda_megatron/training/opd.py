"""Stage 2 (on-policy distillation): the live student samples, the co-located teacher scores.

Sampling runs the same pipeline schedule forward-only, one new token per pass over the whole
prefix (no KV cache: the models at hand are small, and it keeps a single code path under any
TP/EP/PP layout). Prompts are left-padded; pads are masked out of attention and of the loss.
Because every sampling pass recomputes the full prefix, the routing that chose each sampled token
equals the routing of one forward over the final sequence: that forward records it with
megatron-core's RouterReplay, and the training forward replays it, so the router is trained on the
tokens it routed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zeda_megatron.distributed import all_reduce_host, comm_device
from zeda_megatron.training.engine import _run_schedule


def left_pad(prompts: list[list[int]], pad_id: int, length: int):
    """[b, length] tokens with prompts right-aligned, and the number of pads per row."""
    rows, pads = [], []
    for p in prompts:
        p = p[-length:]
        pads.append(length - len(p))
        rows.append([pad_id] * (length - len(p)) + list(p))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(pads, dtype=torch.long)


def attention_inputs(pads: torch.Tensor, length: int):
    """Position ids and megatron attention mask (True = masked) for left-padded rows: causal, pads
    masked as keys; a pad query sees itself only (keeps its row finite)."""
    idx = torch.arange(length)
    position_ids = (idx.unsqueeze(0) - pads.unsqueeze(1)).clamp_min(0)
    causal = idx.unsqueeze(0) > idx.unsqueeze(1)  # [q, k]: future keys masked
    key_pad = idx.unsqueeze(0) < pads.unsqueeze(1)  # [b, k]
    mask = causal.unsqueeze(0) | key_pad.unsqueeze(1)
    diag = torch.eye(length, dtype=torch.bool).unsqueeze(0)
    mask = mask & ~diag  # every query may attend to itself
    return position_ids, mask.unsqueeze(1)


def _last_logits(output, non_loss_data=True):
    """collect_non_loss_data loss_func: the last position's logits, full vocabulary."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    last = output[:, -1, :].float()  # student logits (the teacher is off while sampling)
    if ps.get_tensor_model_parallel_world_size() > 1:
        last = gather_from_tensor_model_parallel_region(last)
    return last


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


@torch.no_grad()
def sample(engine, prompt_batches: list[list[list[int]]], *, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, generator: torch.Generator):
    """Sample a response for every prompt. ``prompt_batches``: micro-batches of token-id lists.

    Returns per micro-batch dicts with tokens [b, L-1], labels [b, L-1], loss_mask (sampled,
    pre-EOS-inclusive positions), position_ids, attention_mask; all micro-batches share L."""
    from megatron.core import parallel_state as ps

    prompt_len = max(len(p) for mb in prompt_batches for p in mb)
    seqs, pads = zip(*(left_pad(mb, pad_id, prompt_len) for mb in prompt_batches))
    seqs, pads = list(seqs), list(pads)
    done = [torch.zeros(s.shape[0], dtype=torch.bool) for s in seqs]
    gen_mask = [torch.zeros(s.shape[0], 0, dtype=torch.bool) for s in seqs]
    engine.wrapper.eval()
    engine.wrapper.teacher_enabled = False
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    try:
        for _ in range(max_new_tokens):
            length = seqs[0].shape[1]
            mbs = []
            for s, p in zip(seqs, pads):
                pos, mask = attention_inputs(p, length)
                mbs.append({"tokens": s, "position_ids": pos, "attention_mask": mask})

            def forward_step(data_iterator, model):
                b = next(data_iterator)
                return model(b["tokens"], b["position_ids"], b["attention_mask"]), _last_logits

            out = _run_schedule(engine, mbs, True, forward_step, seq_length=length, collect_non_loss_data=True)
            for i in range(len(seqs)):
                if last_stage:
                    probs = torch.softmax(out[i] / max(temperature, 1e-5), dim=-1)
                    nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
                else:
                    nxt = torch.zeros(seqs[i].shape[0], dtype=torch.long)
                nxt = _broadcast_from_last_stage(nxt.to(comm_device())).cpu()
                live = ~done[i]
                nxt = torch.where(live, nxt, torch.full_like(nxt, pad_id))
                gen_mask[i] = torch.cat([gen_mask[i], live.unsqueeze(1)], dim=1)
                done[i] = done[i] | (nxt == eos_id)
                seqs[i] = torch.cat([seqs[i], nxt.unsqueeze(1)], dim=1)
            if _all_ranks_done(all(d.all() for d in done)):
                break
    finally:
        engine.wrapper.teacher_enabled = True
    batches = []
    for s, p, g in zip(seqs, pads, gen_mask):
        length = s.shape[1] - 1
        pos, mask = attention_inputs(p, length)
        loss_mask = torch.zeros(s.shape[0], length)
        loss_mask[:, length - g.shape[1]:] = g.float()  # label t is token t+1: the sampled ones
        batches.append({"tokens": s[:, :-1], "labels": s[:, 1:], "loss_mask": loss_mask,
                        "position_ids": pos, "attention_mask": mask})
    return batches


def _all_ranks_done(local_done: bool) -> bool:
    """Every rank must run the same number of sampling passes (EP all-to-alls and PP sends pair
    up across ranks): stop only when all of them are done."""
    return bool(all_reduce_host(torch.tensor([1 if local_done else 0]), op=dist.ReduceOp.MIN).item())


@torch.no_grad()
def record_routing(engine, batches):
    """Forward-only pass over the sampled sequences recording each MoE layer's top-k choices."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    recorded = []
    engine.wrapper.eval()
    engine.wrapper.teacher_enabled = False
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["tokens"], b["position_ids"], b["attention_mask"])
            recorded.append([t.clone() for t in RouterReplay.get_recorded_data()])
            return out, lambda output, non_loss_data=True: None

        _run_schedule(engine, batches, True, forward_step, seq_length=batches[0]["tokens"].shape[1],
                      collect_non_loss_data=True)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        engine.wrapper.teacher_enabled = True
    return recorded
