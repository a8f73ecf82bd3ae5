"""``sample``: responses to a set of prompts from the live training model, ready to train on."""

from __future__ import annotations

from zeda_megatron.plan.memory import TOKEN_BUDGET

import contextlib

import torch

from zeda_megatron.training.rollout.assemble import Rollout, build_rollout
from zeda_megatron.training.rollout.engine import Engine
from zeda_megatron.training.rollout.model import (
    check_inference_settings, decoding_mode, moe_routers, recording_routing, routing_counters_kept, unwrap,
)
from zeda_megatron.training.rollout.sampling import base_seed_from
from zeda_megatron.training.rollout.slots import Sequence


def _limits(max_new_tokens, prompt_batches) -> list[int]:
    """One limit per prompt (flattened): an int for all, or lists shaped like ``prompt_batches``."""
    if isinstance(max_new_tokens, int):
        out = [max_new_tokens] * sum(len(mb) for mb in prompt_batches)
    else:
        out = [int(n) for mb in max_new_tokens for n in mb]
        if len(out) != sum(len(mb) for mb in prompt_batches):
            raise ValueError("max_new_tokens per prompt must have the prompts' shape")
    if any(n < 1 for n in out):
        raise ValueError(f"max_new_tokens must be >= 1, got {min(out)}")
    return out


@torch.no_grad()
def sample(model, prompt_batches, *, max_new_tokens, eos_id: int, pad_id: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
           prompt_keys: list | None = None, slots: int | None = None, refill: bool = True,
           tp_multiple: int | None = None, record_routing: bool | None = None, use_cache: bool = True,
           mla_cache: str = "latent", token_budget: int = TOKEN_BUDGET, on_finished=None, flush_every: int = 64) -> Rollout:
    """Sample a response to every prompt with the model as it is laid out for training.

    model: the student (GPTModel, or DDP/Float16Module/any wrapper with ``.module``) on this rank.
    prompt_batches: micro-batches of prompts (lists of token ids, BOS included as the caller wants);
        the result keeps this grouping. Every rank of a model replica passes the same prompts; ranks
        of other replicas may pass any number (all ranks step together until all are done).
    max_new_tokens: sampled tokens per prompt at most (EOS included): an int, or per prompt (lists
        shaped like ``prompt_batches``).
    temperature: 0 = greedy. top_p: nucleus mass (1 = off).
    seed / prompt_keys: prompt j's random draws come from its own stream (``sampling.stream_seed(seed,
        key_j)``, key_j = ``prompt_keys[j]``, default its flattened index), so a response never depends
        on which prompts share its steps. ``generator``: draws the base seed when ``seed`` is None.
    slots: decode slots (sequences in flight); default every prompt at once. With fewer slots than
        prompts, a slot freed by EOS/the limit takes the next prompt (``refill=False``: only when all
        slots are free, i.e. static batches).
    tp_multiple: the training sequence length is padded to a multiple of it (default: the TP size
        when the model trains with sequence parallelism, else 1).
    record_routing: record each MoE layer's routing for router replay (default: when the routers
        have megatron-core's RouterReplay, i.e. ``moe_enable_routing_replay``).
    use_cache: False recomputes every prefix at every step with the model's own attention (the
        reference the cache is tested against; the benchmark's slowest baseline).
    mla_cache: MLA models: ``latent`` (compressed latent + rope key, absorbed decode) or ``full``.
    token_budget: tokens one step feeds at most (decode tokens + prompt chunks).
    on_finished: streaming (generation of many prompts): ``on_finished(sequences)`` is called on every
        rank in lockstep every ``flush_every`` steps and at the end with the sequences (``.index``,
        ``.key``, ``.tokens``, ``.prompt``) that ended since; nothing is kept or assembled, and
        a rank may pass no prompts at all (it steps with the others). Returns a Rollout whose
        ``responses`` hold None for every delivered sequence.
    """
    from megatron.core import parallel_state as ps

    if temperature > 0 and seed is None:
        if generator is None:
            raise ValueError("sampling with temperature > 0 needs a seed (or a torch.Generator)")
        seed = base_seed_from(generator)
    check_inference_settings(model)
    flat = [list(p) for mb in prompt_batches for p in mb]
    if (not flat and on_finished is None) or any(len(p) == 0 for p in flat):
        raise ValueError("every prompt needs at least one token (add BOS)")
    limits = _limits(max_new_tokens, prompt_batches)
    keys = list(range(len(flat))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(keys) != len(flat):
        raise ValueError(f"prompt_keys has {len(keys)} keys for {len(flat)} prompts")
    gpt = unwrap(model)
    sp_training = bool(gpt.config.sequence_parallel)
    if tp_multiple is None:
        tp_multiple = ps.get_tensor_model_parallel_world_size() if sp_training else 1
    all_routers = moe_routers(gpt)
    routers = [r for r in all_routers if getattr(r, "router_replay", None) is not None]
    if record_routing is None:
        record_routing = bool(routers)
    if record_routing and (not routers or len(routers) != len(all_routers)):
        raise ValueError("record_routing needs RouterReplay on every MoE router: build the student with "
                         "moe_enable_routing_replay=True")
    routers = routers if record_routing else []
    sequences = [Sequence(j, p, n, k) for j, (p, n, k) in enumerate(zip(flat, limits, keys))]
    engine = Engine(gpt, n_slots=max(1, min(int(slots or len(flat)), len(flat))),
                    length=max((len(p) + n for p, n in zip(flat, limits)), default=1), eos_id=eos_id, pad_id=pad_id,
                    temperature=temperature, top_p=top_p, seed=int(seed or 0), routers=routers, cached=use_cache,
                    mla_cache=mla_cache, refill=refill, token_budget=token_budget)
    with contextlib.ExitStack() as stack:
        stack.enter_context(routing_counters_kept(gpt))
        stack.enter_context(decoding_mode(gpt))
        stack.enter_context(recording_routing(routers))
        try:
            done, routing = engine.run(sequences, on_finished, flush_every)
        finally:
            if not engine.pipe.first:
                gpt.set_input_tensor(None)
    if on_finished is not None:
        return Rollout([], None, [], [[None for _ in mb] for mb in prompt_batches], forwards=engine.stats.forwards,
                       stats=engine.stats)
    out = build_rollout(prompt_batches, done, routing if record_routing else None, routers, pad_id=pad_id,
                        tp_multiple=tp_multiple, sp=sp_training)
    out.forwards, out.stats = engine.stats.forwards, engine.stats
    return out
