"""KV-cached rollouts (zeda_megatron.training.rollout): cached sampling equals prefix recompute
(greedy and seeded sampling: identical tokens; log-probs rel. 1e-5, fp32) under tp=1, ep=2, pp=2 and
tp=2+SP; the router-replay indices assembled while sampling are the sampling-time routing, laid out
in the training forward's token order (a replayed training forward reproduces the sampling
distribution, and a free forward over the final sequences routes the same); offloading the grad
buffers and optimizer state while sampling leaves three stage-2 steps bit-identical."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_distributed

PROMPTS = [  # right-padded micro-batches of different prompt lengths (forced prompt tokens)
    [[5, 9, 11, 3, 7], [8, 2], [4, 4, 6, 1]],
    [[12, 13, 14], [15, 16, 17, 18, 19, 20]],
]


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


def _layout_worker(rank, world, hf_dir, tp, pp, ep, sp):
    from megatron.core import parallel_state as ps

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training.rollout import sample

    init_parallel(tp=tp, pp=pp, ep=ep, seed=0)
    model = _build(hf_dir, sequence_parallel=sp)
    prompts = _prompts(ps.get_data_parallel_rank())
    common = dict(max_new_tokens=12, eos_id=127, pad_id=0)
    from zeda_megatron.mcore.specs import moe_layers, routing_stats

    out = {}
    before = routing_stats(model)
    sample(model, prompts[:1], temperature=0.0, **common)
    # sampling leaves the routing counters as they were and the null-aware dispatchers in place
    out["counters_kept"] = routing_stats(model) == before and before["tokens"] == 0
    out["dispatchers"] = {type(m.token_dispatcher).__name__ for m in moe_layers(model)}
    for name, kw in {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_p=0.9)}.items():
        for cache in (True, False):
            gen = torch.Generator().manual_seed(42)
            r = sample(model, prompts, generator=gen, use_cache=cache, **kw, **common)
            out[(name, cache)] = {"batches": r.batches, "logprobs": r.logprobs, "responses": r.responses,
                                  "forwards": r.forwards, "gen_state": gen.get_state()}
            if cache and name == "sampled":
                checks = []
                for b, rep, lp in zip(r.batches, r.replay, r.logprobs):
                    replay_lp, free = _replayed_forward(model, b, rep)
                    checks.append({"replay_lp": replay_lp, "sample_lp": lp, "mask": b["loss_mask"],
                                   "replay": rep, "free": free, "pad": b["padding_mask"]})
                out["checks"] = checks
                out["sp_after"] = bool(model.config.sequence_parallel)
    out["last_stage"] = ps.is_pipeline_last_stage()
    out["tp_rank"], out["tp"] = ps.get_tensor_model_parallel_rank(), tp
    return out


LAYOUTS = {  # name: (family, world, tp, pp, ep, sp)
    "tp1": ("glm4_moe_lite", 1, 1, 1, 1, False),
    "ep2": ("qwen3_moe", 2, 1, 1, 2, False),
    "pp2": ("glm4_moe_lite", 2, 1, 2, 1, False),
    "tp2_sp": ("qwen3_moe", 2, 2, 1, 1, True),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_run(request, tmp_path_factory):
    from bridge_fixtures import make_tiny_hf

    family, world, tp, pp, ep, sp = LAYOUTS[request.param]
    hf = make_tiny_hf(family, str(tmp_path_factory.mktemp(request.param) / "hf"), seed=1)
    return request.param, run_distributed(_layout_worker, world, hf, tp, pp, ep, sp)


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
        sampled = res[("sampled", True)]
        assert any(len(r) > 1 for mb in sampled["responses"] for r in mb)
        assert all(len(r) <= 12 for mb in sampled["responses"] for r in mb)
    # every rank of a model replica holds the same rollout; DP replicas differ
    assert results[0][("sampled", True)]["responses"] == results[-1][("sampled", True)]["responses"] or name == "ep2"


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


def test_bench_rollout_reduced():
    """tools/bench_rollout.py end to end at a tiny size: the JSON line's keys, both modes' tokens equal."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "tools/bench_rollout.py", "--hidden", "64", "--layers", "2", "--experts", "4",
         "--null-experts", "2", "--topk", "2", "--vocab", "512", "--batch", "2", "--prompt", "4",
         "--new-tokens", "8", "--checkpoints", "4,8"],
        cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"cached_tokens_per_s", "recompute_tokens_per_s", "speedup", "peak_rss_bytes"} <= out.keys()
    assert out["identical_tokens"] is True and set(out["speedup_at"]) == {"4", "8"}
    assert out["speedup"] == out["speedup_at"]["8"] and out["peak_rss_bytes"] > 0
    assert "| 8 |" in res.stdout
