"""Rollouts from the live training model under its training layout (TP, EP, PP, DP).

    from zeda_megatron.training.rollout import sample

    with engine.offloaded_for_sampling():                 # optional: free grads + optimizer state
        r = sample(student, prompt_batches, max_new_tokens=512, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   temperature=1.0, seed=seed, slots=16)
    train_step(engine, r.batches, replay=r.replay)        # the trainer's batch dicts + router replay

How it runs (one concern per module):

* :mod:`.slots` - continuous batching: ``slots`` sequences in flight; a slot freed by EOS or the
  length limit takes the next prompt (its prefill runs in the slot) while the others keep decoding.
* :mod:`.kv_cache` - a per-slot KV cache on megatron-core's own attention modules (projections,
  norms, RoPE): GQA caches K/V of this TP rank's heads; MLA caches the compressed latent + rope key
  and decodes with the absorbed projections. Torch SDPA, the same code on CPU and GPU.
* :mod:`.engine` - the step loop: pipeline stages in lockstep, sampling on the last stage, one host
  synchronisation per step, every rank stepping until all are done (EP all-to-alls pair up).
* :mod:`.sampling` - token choice (greedy, temperature, top-p) with each prompt's own seeded
  stream: a response equals sampling that prompt alone.
* :mod:`.assemble` - the trainer's micro-batches and the router-replay indices (the routing chosen
  while sampling, in the training forward's token order: no second forward, and numerical
  differences between cached decoding and a full forward can never flip a replayed choice).
* :mod:`.model` - unwrapping, settings checks, decoding mode (eval, sequence parallelism off).

Why not megatron-core's DynamicInferenceContext: see docs/rollouts.md.
"""

from zeda_megatron.training.rollout.assemble import Rollout, replay_fill, training_order
from zeda_megatron.training.rollout.engine import Engine, EngineStats
from zeda_megatron.training.rollout.model import (
    check_inference_settings, decoding_mode, moe_routers, routing_counters_kept, unwrap,
)
from zeda_megatron.training.rollout.sampler import sample
from zeda_megatron.training.rollout.sampling import choose_tokens, stream_seed

__all__ = [
    "Engine", "EngineStats", "Rollout", "check_inference_settings", "choose_tokens", "decoding_mode", "moe_routers",
    "replay_fill", "routing_counters_kept",
    "sample", "stream_seed", "training_order", "unwrap",
]
