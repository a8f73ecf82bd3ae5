"""The stage-2 sampler (zeda_megatron.training.rollout) under tp=1, ep=2, pp=2 and tp=2+SP:

* KV-cached sampling equals prefix recompute through the model's own attention (greedy and seeded
  sampling: identical tokens; log-probs rel. 1e-5, fp32);
* refilled slots (fewer slots than prompts, sequences of different lengths, EOS and length limits)
  equal sampling each prompt alone: tokens, log-probs and the routing recorded while sampling;
* MLA's latent cache (absorbed decode) equals the full K/V cache (every logit rel. 1e-5, fp32) at
  TP1 and TP2;
* the router-replay indices assembled while sampling are the sampling-time routing, laid out in the
  training forward's token order (a replayed training forward reproduces the sampling distribution,
  and a free forward over the final sequences routes the same);
* offloading the grad buffers and optimizer state while sampling leaves three stage-2 steps
  bit-identical."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_distributed

PROMPTS = [  # micro-batches of different prompt lengths
    [[5, 9, 11, 3, 7], [8, 2], [4, 4, 6, 1]],
    [[12, 13, 14], [15, 16, 17, 18, 19, 20]],
]
LIMITS = [[3, 12, 7], [5, 9]]  # per-prompt response limits: slots free at different steps


def _prompts(dp_rank):
    """Data-parallel ranks get different prompts (EP: other lengths and stop times; all-to-alls pair)."""
    prompts = [[[(t + 7 * dp_rank) % 120 + 1 for t in p] for p in mb] for mb in PROMPTS]
    return [mb[:-1] + [mb[-1] + [3, 3]] for mb in prompts] if dp_rank else prompts


def _build(hf_dir, *, sequence_parallel=False, replay=True, null=4):
    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.bridge.import_hf import load_hf_weights
    from zeda_megatron.mcore.config import NullExpertSettings
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    model, _, _ = build_model(hf_dir, NullExpertSettings(null, 2.0), moe_enable_routing_replay=replay,
                              sequence_parallel=sequence_parallel)
    load_hf_weights(model, hf_dir, seed=0)
    return model


def _stage_forward(model, batch, **kw):
    """One training-layout forward through the pipeline stages (plain send/recv between stages)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    S, b = batch["tokens"].shape[1], batch["tokens"].shape[0]
    if not ps.is_pipeline_first_stage():
        tp = ps.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
        buf = torch.empty(S // tp, b, model.config.hidden_size)
        dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(buf)
    out = model(batch["tokens"], batch["position_ids"], None, padding_mask=batch["padding_mask"], **kw)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _replayed_forward(model, batch, replay_mb):
    """Training-layout forward (padding mask, SP as configured) replaying ``replay_mb``; returns the
    full-vocabulary log-prob of every label [b, S] (last stage) and the routing a free forward records."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    model.eval()
    RouterReplay.set_replay_data(replay_mb)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        logits = _stage_forward(model, batch, runtime_gather_output=True)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        _stage_forward(model, batch, runtime_gather_output=True)
        free = [t.clone() for t in RouterReplay.get_recorded_data()]
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
    if logits is None:
        return None, free
    lp = torch.log_softmax(logits.float(), -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    return lp, free


# the same tokens fed step by step into two slots: a 5-token chunk from position 0 and a 1-token prompt,
# then one token each, then a single token and a 3-token chunk that attends to its cached prefix
MLA_STEPS = [  # (ids, positions, slots)
    ([5, 9, 11, 3, 7, 8], [0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 0, 1]),
    ([20, 21], [5, 1], [0, 1]),
    ([22, 23, 24, 25], [6, 2, 3, 4], [0, 1, 1, 1]),
]


def _mla_logits(model, mode):
    """Full-vocabulary logits of every fed token along MLA_STEPS with ``mla_cache=mode`` (PP=1)."""
    from zeda_megatron.training.rollout.kv_cache import SlotCache, StepInfo, cached_attention
    from zeda_megatron.training.rollout.model import decoding_mode

    def all_logits(hidden_states, output_layer, output_weight, **_):
        return output_layer(hidden_states, weight=output_weight, runtime_gather_output=True)[0][:, 0].float()

    cache, out = SlotCache(2, 16), []
    with torch.no_grad(), decoding_mode(model) as gpt, cached_attention(gpt, cache, mode):
        for ids, pos, slots in MLA_STEPS:
            singles = [i for i, s in enumerate(slots) if slots.count(s) == 1]
            chunks = []
            for s in sorted(set(slots)):
                idx = [i for i, x in enumerate(slots) if x == s]
                if len(idx) > 1:
                    chunks.append((idx[0], idx[-1] + 1, s, pos[idx[0]]))
            t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
            si = t(singles)
            cache.step = StepInfo(slot=t(slots), pos=t(pos), singles=si, single_slot=t(slots)[si],
                                  single_len=t(pos)[si] + 1, single_max=max(pos[i] + 1 for i in singles),
                                  single_contiguous=False, chunks=chunks)
            out.append(gpt(t(ids).view(1, -1), t(pos).view(1, -1), None, output_processor=all_logits))
    return torch.cat(out), cache.bytes()


def _run(model, prompts, **kw):
    from zeda_megatron.training.rollout import sample

    r = sample(model, prompts, eos_id=kw.pop("eos_id", 127), pad_id=0, **kw)
    return {"batches": r.batches, "logprobs": r.logprobs, "responses": r.responses, "forwards": r.forwards,
            "routing": r.routing, "replay": r.replay, "syncs": r.stats.host_syncs}


def _family_worker(model, family, tp, pp):
    from megatron.core import parallel_state as ps

    from zeda_megatron.mcore.specs import moe_layers, routing_stats

    prompts = _prompts(ps.get_data_parallel_rank())
    out = {"family": family, "dp_rank": ps.get_data_parallel_rank()}
    before = routing_stats(model)
    _run(model, prompts[:1], max_new_tokens=4, temperature=0.0)
    # sampling leaves the routing counters as they were and the null-aware dispatchers in place
    out["counters_kept"] = routing_stats(model) == before and before["tokens"] == 0
    out["dispatchers"] = {type(m.token_dispatcher).__name__ for m in moe_layers(model)}
    modes = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_p=0.9)}
    for mode, kw in modes.items():
        for cache in (True, False):
            gen = torch.Generator().manual_seed(42)
            out[(mode, cache)] = _run(model, prompts, max_new_tokens=12, generator=gen, use_cache=cache, **kw)
            out[(mode, cache)]["gen_state"] = gen.get_state()
    # refilled slots: all prompts through 2 slots, then each prompt alone (same seed, same key)
    flat = [p for mb in prompts for p in mb]
    limits = [n for mb in LIMITS for n in mb]
    eos = out[("greedy", True)]["responses"][0][1][3]  # greedy emits it at prompt 1's 4th token: an EOS stop
    for mode, kw in modes.items():
        kw = dict(kw, seed=7, eos_id=eos)
        out[("refill", mode)] = _run(model, [flat], max_new_tokens=[limits], slots=2, token_budget=4, **kw)
        out[("alone", mode)] = [_run(model, [[p]], max_new_tokens=[[n]], prompt_keys=[j], **kw)
                                for j, (p, n) in enumerate(zip(flat, limits))]
    checks = []
    r = out[("sampled", True)]
    for b, rep, lp in zip(r["batches"], r["replay"], r["logprobs"]):
        replay_lp, free = _replayed_forward(model, b, rep)
        checks.append({"replay_lp": replay_lp, "sample_lp": lp, "mask": b["loss_mask"],
                       "replay": rep, "free": free, "pad": b["padding_mask"]})
    out["checks"] = checks
    out["sp_after"] = bool(model.config.sequence_parallel)
    if family == "glm4_moe_lite":
        for mode in ("greedy", "sampled"):
            out[("mla_full", mode)] = _run(model, prompts, max_new_tokens=12, seed=42, mla_cache="full", **modes[mode])
            out[("mla_latent", mode)] = _run(model, prompts, max_new_tokens=12, seed=42, **modes[mode])
        if pp == 1:
            out["mla_logits"] = {m: _mla_logits(model, m) for m in ("latent", "full")}
    out["last_stage"] = ps.is_pipeline_last_stage()
    out["tp_rank"], out["tp"] = ps.get_tensor_model_parallel_rank(), tp
    return out


def _layout_worker(rank, world, hf_dirs, tp, pp, ep, sp):
    from zeda_megatron.distributed import init_parallel

    init_parallel(tp=tp, pp=pp, ep=ep, seed=0)
    return [_family_worker(_build(hf, sequence_parallel=sp), fam, tp, pp) for fam, hf in hf_dirs]


LAYOUTS = {  # name: (families, world, tp, pp, ep, sp)
    "tp1": (("glm4_moe_lite",), 1, 1, 1, 1, False),
    "ep2": (("qwen3_moe",), 2, 1, 1, 2, False),
    "pp2": (("glm4_moe_lite",), 2, 1, 2, 1, False),
    "tp2_sp": (("qwen3_moe", "glm4_moe_lite"), 2, 2, 1, 1, True),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_run(request, tmp_path_factory):
    from bridge_fixtures import make_tiny_hf

    families, world, tp, pp, ep, sp = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hfs = [(f, make_tiny_hf(f, str(root / f), seed=1)) for f in families]
    per_rank = run_distributed(_layout_worker, world, hfs, tp, pp, ep, sp)
    return request.param, [res for rank in per_rank for res in rank]  # every (rank, family) result


def test_cached_sampling_equals_prefix_recompute(layout_run):
    name, results = layout_run
    for res in results:
        for mode in ("greedy", "sampled"):
            cached, recomputed = res[(mode, True)], res[(mode, False)]
            assert cached["responses"] == recomputed["responses"], (name, mode)
            assert cached["forwards"] == recomputed["forwards"]
            assert torch.equal(cached["gen_state"], recomputed["gen_state"])
            for a, b in zip(cached["batches"], recomputed["batches"]):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            for a, b in zip(cached["logprobs"], recomputed["logprobs"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            # the routing recorded while decoding from the cache = while recomputing every prefix
            for a, b in zip(cached["routing"], recomputed["routing"]):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
            # one host synchronisation per step
            assert cached["syncs"] == cached["forwards"]
        sampled = res[("sampled", True)]
        assert any(len(r) > 1 for mb in sampled["responses"] for r in mb)
        assert all(len(r) <= 12 for mb in sampled["responses"] for r in mb)
    # every rank of a model replica holds the same rollout; DP replicas differ
    for family in {r["family"] for r in results}:
        same = [r[("sampled", True)]["responses"] for r in results if r["family"] == family]
        assert (same[0] == same[-1]) == (name != "ep2")


def test_refilled_slots_equal_each_prompt_alone(layout_run):
    """2 slots for 5 prompts of different limits (and EOS): every prompt's tokens, log-probs and
    recorded routing equal sampling it alone."""
    name, results = layout_run
    for res in results:
        ended_early = 0
        for mode in ("greedy", "sampled"):
            together, alone = res[("refill", mode)], res[("alone", mode)]
            limits = [n for mb in LIMITS for n in mb]
            assert len(alone) == len(together["responses"][0]) == 5
            for j, one in enumerate(alone):
                assert together["responses"][0][j] == one["responses"][0][0], (name, mode, j)
                n = len(one["responses"][0][0])
                assert 1 <= n <= limits[j]
                ended_early += n < limits[j]
                plen = len([p for mb in _prompts(res["dp_rank"]) for p in mb][j])
                a = together["logprobs"][0][j]
                b = one["logprobs"][0][0]
                m = together["batches"][0]["loss_mask"][j].bool()
                torch.testing.assert_close(a[m], b[one["batches"][0]["loss_mask"][0].bool()], rtol=1e-5, atol=1e-6)
                assert len(together["routing"][j]) == len(one["routing"][0]) > 0
                for x, y in zip(together["routing"][j], one["routing"][0]):
                    assert x.shape[0] >= plen - 1 and torch.equal(x, y)
            # fewer slots than prompts: more forwards than the longest response, fewer than all in a row
            assert together["forwards"] < sum(one["forwards"] for one in alone)
            assert together["syncs"] == together["forwards"]
        assert ended_early > 0  # some sequences stopped at EOS: their slots were refilled mid-stream


def test_mla_latent_cache_equals_full_cache(layout_run):
    """GLM (MLA): the latent cache (compressed KV + rope key, absorbed decode) gives the full K/V
    cache's outputs - every logit of prefill chunks, decode steps and a chunk over a cached prefix
    (TP1, TP2) - and the same samples (all layouts), with a smaller cache."""
    name, results = layout_run
    glm = [r for r in results if r["family"] == "glm4_moe_lite"]
    if name in ("tp1", "tp2_sp"):
        assert glm and all("mla_logits" in r for r in glm)
    for res in glm:
        for mode in ("greedy", "sampled"):
            full, latent = res[("mla_full", mode)], res[("mla_latent", mode)]
            assert full["responses"] == latent["responses"]
            for a, b in zip(full["logprobs"], latent["logprobs"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if "mla_logits" in res:
            (lat, lat_bytes), (ful, ful_bytes) = res["mla_logits"]["latent"], res["mla_logits"]["full"]
            assert lat.shape == ful.shape and lat.shape[0] == sum(len(s[0]) for s in MLA_STEPS)
            torch.testing.assert_close(lat, ful, rtol=1e-5, atol=1e-5 * ful.abs().max().item())
            assert lat_bytes < ful_bytes


def test_rollout_batches_follow_the_contract(layout_run):
    name, results = layout_run
    res = results[0]
    r = res[("sampled", True)]
    lengths = {b["tokens"].shape[1] for b in r["batches"]}
    assert len(lengths) == 1 and lengths.pop() % res["tp"] == 0
    for prompts, b, resp in zip(_prompts(0), r["batches"], r["responses"]):
        for i, p in enumerate(prompts):
            n, row = len(p), b["tokens"][i]
            real = int((~b["padding_mask"][i]).sum())
            # tokens: prompt, then response, then pads (the last token has no label: a pad for the router)
            assert real == n + len(resp[i]) - 1 and row[:n].tolist() == p
            assert not b["padding_mask"][i, :real].any()
            assert b["loss_mask"][i].sum() == len(resp[i])
            on = b["loss_mask"][i].bool()
            assert b["labels"][i][on].tolist() == resp[i]
            assert not b["padding_mask"][i, : n].any()
            assert (b["position_ids"][i] == torch.arange(row.numel())).all()
            assert b["loss_mask"][i, : n - 1].sum() == 0  # no loss on the prompt


def test_replayed_routing_is_the_sampling_routing(layout_run):
    name, results = layout_run
    for res in results:
        assert res["sp_after"] == (name == "tp2_sp")  # SP restored after decoding
        assert res["counters_kept"] and res["dispatchers"] == {"NullAwareAlltoAllDispatcher"}
        for c in res["checks"]:
            assert len(c["replay"]) == len(c["free"]) > 0
            if c["replay_lp"] is not None:  # last stage: the replayed forward gives the sampling log-probs
                m = c["mask"].bool()
                torch.testing.assert_close(c["replay_lp"][m], c["sample_lp"][m], rtol=1e-5, atol=1e-5)
            # a free forward over the final sequences routes every real token as sampling did
            b, S = c["pad"].shape
            for rep, free in zip(c["replay"], c["free"]):
                assert rep.shape == free.shape
                k = rep.shape[-1]
                s_local = rep.shape[0] // b
                lo = res["tp_rank"] * s_local if name == "tp2_sp" else 0
                real = ~c["pad"][:, lo: lo + s_local].t().reshape(-1)  # s-major token order
                assert torch.equal(rep.view(-1, k)[real].sort(-1).values, free.view(-1, k)[real].sort(-1).values)


# ---- offloading while sampling ------------------------------------------------------------------------
def _offload_worker(rank, world, hf_dir, offload):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training.offload import offloaded
    from zeda_megatron.training.rollout import sample

    init_parallel(seed=0)
    model = _build(hf_dir)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [ddp])
    losses, freed = [], []
    for step in range(3):
        with offloaded(ddp, opt, enabled=offload) as handle:
            if offload:
                freed.append((sum(b.grad_data.untyped_storage().size() for b in ddp.buffers),
                              [v.untyped_storage().size() for v, _ in handle.tensors]))
            r = sample(ddp, PROMPTS, max_new_tokens=6, eos_id=127, pad_id=0, temperature=1.0,
                       generator=torch.Generator().manual_seed(step))
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp.train()
        total = torch.zeros(())
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        for b, rep in zip(r.batches, r.replay):
            RouterReplay.set_replay_data(rep)
            nll = ddp(b["tokens"], b["position_ids"], None, labels=b["labels"], padding_mask=b["padding_mask"])
            loss = (nll * b["loss_mask"]).sum() / b["loss_mask"].sum()
            loss.backward()
            total += loss.detach()
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        finalize_model_grads([ddp])
        opt.step()
        losses.append(total.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "params": params, "freed": freed}


def test_offloading_while_sampling_leaves_stage2_bit_identical(tmp_path):
    from bridge_fixtures import make_tiny_hf

    hf = make_tiny_hf("qwen3_moe", str(tmp_path / "hf"), seed=2)
    (plain,) = run_distributed(_offload_worker, 1, hf, False)
    (off,) = run_distributed(_offload_worker, 1, hf, True)
    assert plain["losses"] == off["losses"]
    assert plain["params"].keys() == off["params"].keys()
    assert all(torch.equal(plain["params"][k], off["params"][k]) for k in plain["params"])
    # while sampling the grad buffers and the Adam state held no memory (from step 2 on Adam has state)
    for grads, states in off["freed"]:
        assert grads == 0 and all(s == 0 for s in states)
    assert len(off["freed"][1][1]) > 0
    assert plain["losses"][0] != plain["losses"][2]  # the model trained


def test_inference_optimized_is_refused(tmp_path):
    """megatron-core's inference-optimised MoE would bypass the null-aware dispatcher."""
    from types import SimpleNamespace

    from zeda_megatron.training.rollout import check_inference_settings

    fake = SimpleNamespace(decoder=None, config=SimpleNamespace(transformer_impl="inference_optimized"),
                           modules=lambda: [])
    with pytest.raises(ValueError, match="inference_optimized"):
        check_inference_settings(fake)


def test_choose_tokens_greedy_top_p():
    from zeda_megatron.training.rollout import choose_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
    assert choose_tokens(logits, None, 0.0, 1.0).tolist() == [0, 3]
    # top_p=0.7 keeps {0, 1} in row 0 (0.5 + 0.3 reaches it): u near 1 picks 1, never 2 or 3
    assert choose_tokens(logits, torch.tensor([0.99, 0.0]), 1.0, 0.7).tolist() == [1, 3]
    assert choose_tokens(logits, torch.tensor([0.99, 0.99]), 1.0, 1.0).tolist() == [3, 3]
    assert choose_tokens(logits, torch.tensor([0.6, 0.3]), 1.0, 1.0).tolist() == [1, 3]
