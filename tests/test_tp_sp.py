"""Tensor parallel + sequence parallel on CPU/gloo equals TP = 1 on the same weights and batches.

Tiny GLM-4.7-Flash-shaped (MLA, sigmoid router + expert bias, shared expert, first layer dense) and
Qwen3-MoE-shaped models are imported through the bridge with null experts and the group balance
loss on, then trained one step (DDP + finalize_model_grads, per-token loss, as the trainer does) at

- TP=2 + SP on 2 ranks (expert-TP 2: the AlltoAll dispatcher's uneven expert-TP gather runs), and
- TP=2 x EP=2 on 4 ranks (expert-TP 1, DP 2: each DP replica trains its own micro-batch),

and, in the same processes, at TP=1. Checked: every micro-batch's loss; EVERY
parameter's gradient, gathered over TP / expert-TP / EP into the full tensor (rel. 1e-5 fp32); the
group loss per layer (the ranks' shares summed over TP); the null-share counters and expert-bias
token counts (summed over all ranks: each token once); with right padding in the batches. The TP=1
reference is also run with 4 more pad positions of random tokens appended: every loss, gradient,
group loss and counter stays the same, so pads reach none of them. Both dispatchers run in both
layouts (one family each).
"""

from __future__ import annotations

import pytest
import torch

from bridge_fixtures import make_tiny_hf
from dist_helpers import run_distributed
from zeda_megatron.bridge.hf_config import GLM, QWEN3

Z, NULL_WEIGHT, COEFF = 4, 2.0, 0.1
S, B = 8, 2
REL = 1e-5


def _batches(n: int, extra_pad: int = 0):
    """``n`` micro-batches [B, S (+extra_pad)], right-padded: lengths (8, 5) and (3, 8). The pad
    positions hold random tokens (different ones when ``extra_pad`` appends positions)."""
    g = torch.Generator().manual_seed(3)
    lengths = [(8, 5), (3, 8)]
    out = []
    for i in range(n):
        tokens = torch.randint(0, 128, (B, S), generator=g)
        labels = torch.randint(0, 128, (B, S), generator=g)
        pad = torch.zeros(B, S, dtype=torch.bool)
        for row, length in enumerate(lengths[i % len(lengths)]):
            pad[row, length:] = True
        if extra_pad:
            g2 = torch.Generator().manual_seed(100 + i)
            tokens = torch.cat([tokens, torch.randint(0, 128, (B, extra_pad), generator=g2)], dim=1)
            labels = torch.cat([labels, torch.randint(0, 128, (B, extra_pad), generator=g2)], dim=1)
            pad = torch.cat([pad, torch.ones(B, extra_pad, dtype=torch.bool)], dim=1)
        noise = torch.Generator().manual_seed(200 + i + extra_pad)  # pad contents differ too
        tokens = torch.where(pad, torch.randint(0, 128, tokens.shape, generator=noise), tokens)
        out.append(dict(tokens=tokens, labels=labels, padding_mask=pad, loss_mask=(~pad).float()))
    return out


# ---- worker side ---------------------------------------------------------------------------------
def _gather(t, group, dim):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _full_grads(model) -> dict:
    """Every parameter's gradient as the full tensor, keyed by its TP=1/EP=1 name (local expert
    index replaced by the global one). TP-split parameters are gathered over (expert-)TP."""
    import re

    from megatron.core import parallel_state as ps

    out = {}
    for name, p in model.named_parameters():
        g = p.main_grad.detach().float().clone()
        is_expert = ".experts.local_experts." in name
        if getattr(p, "tensor_model_parallel", False):
            group = ps.get_expert_tensor_parallel_group() if is_expert else ps.get_tensor_model_parallel_group()
            if group.size() > 1:
                parts = _gather(g, group, p.partition_dim)
                if "linear_fc1" in name and p.partition_dim == 0:  # gated: each shard is [gate_i; up_i]
                    halves = [torch.chunk(x, 2, dim=0) for x in parts]
                    g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
                else:
                    g = torch.cat(parts, dim=p.partition_dim)
        if is_expert:
            layer = model.get_submodule(name.split(".experts.local_experts.")[0])
            local = int(re.search(r"local_experts\.(\d+)\.", name).group(1))
            name = name.replace(f"local_experts.{local}.", f"local_experts.{layer.local_expert_indices[local]}.")
        out[name] = g
    return out


def _train_step(hf_dir, dispatcher, batches, tp):
    """One training step over ``batches`` (this DP replica's micro-batches): per-token loss,
    group loss on, DDP + finalize_model_grads. Returns what the test compares."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.bridge.import_hf import load_hf_weights
    from zeda_megatron.mcore.config import NullExpertSettings
    from zeda_megatron.mcore.specs import moe_layers, routing_stats

    model, _, config = build_model(
        hf_dir, NullExpertSettings(Z, NULL_WEIGHT), sequence_parallel=tp > 1,
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type="grouped_aux_loss",
        moe_aux_loss_coeff=COEFF, calculate_per_token_loss=True,
    )
    load_hf_weights(model, hf_dir)
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
    )
    ddp.train()
    ddp.zero_grad_buffer()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(()))
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    routing_stats(model, reset=True)
    per_batch, num_tokens = [], torch.zeros((), dtype=torch.float32)
    for batch in batches:
        s = batch["tokens"].shape[1]
        pos = torch.arange(s).unsqueeze(0).expand(B, -1)
        token_loss = ddp(batch["tokens"], pos, None, labels=batch["labels"], padding_mask=batch["padding_mask"])
        loss = (token_loss.float() * batch["loss_mask"]).sum()
        loss.backward()
        num_tokens += batch["loss_mask"].sum()
        entry = tracker.metrics["grouped_load_balancing_loss"]
        stats = routing_stats(model, reset=True)
        per_batch.append({
            "loss": loss.item() / batch["loss_mask"].sum().item(),
            "group_loss": entry.values.detach().clone(),
            "counters": {n: {k: s[k] for k in ("tokens", "null_slots", "real_assignments")}
                         for n, s in stats["layers"].items()},
        })
        entry.values.zero_()
    bias_counts = {
        layer.layer_number: layer.router.local_tokens_per_expert.detach().clone()
        for layer in moe_layers(model) if layer.router.enable_expert_bias
    }
    finalize_model_grads([ddp], num_tokens=num_tokens)
    out = {"batches": per_batch, "grads": _full_grads(model), "bias_counts": bias_counts}
    out["eval_counters"] = _eval_counters(model, batches[0], tp)
    if tp > 1:  # a later pipeline stage may hand the MoE layer the whole [b, s] mask
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        pm = batches[0]["padding_mask"]
        want = scatter_to_sequence_parallel_region(pm.transpose(0, 1).contiguous()).transpose(0, 1)
        out["mask_slice_ok"] = torch.equal(moe_layers(model)[0].local_padding_mask(pm, pm.shape[1] // tp), want)
    return out


def _eval_counters(model, batch, tp):
    """Counters of a no-grad forward with sequence parallelism switched off (as generation does):
    every TP rank routes all tokens, only TP rank 0 counts them."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    from zeda_megatron.mcore.specs import routing_stats

    model.eval()
    if tp > 1:
        set_model_to_sequence_parallel(model, False)
    pos = torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand(B, -1)
    with torch.no_grad():
        model(batch["tokens"], pos, None, padding_mask=batch["padding_mask"])
    if tp > 1:
        set_model_to_sequence_parallel(model, True)
    stats = routing_stats(model, reset=True)["layers"]
    return {n: {k: s[k] for k in ("tokens", "null_slots", "real_assignments")} for n, s in stats.items()}


def dist_layouts(rank, world, hf_dirs, cases, tp, ep, etp, n_batches):
    """Worker: each (family, dispatcher) case at TP/EP/ETP over ``world`` ranks, then at TP=1 on
    every rank as a DP replica (on all batches, and on all batches with extra pad positions)."""
    from megatron.core import parallel_state as ps

    from zeda_megatron.distributed import init_parallel

    batches = _batches(n_batches)
    init_parallel(tp=tp, ep=ep, etp=etp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    out = {"tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": dp_rank, "dp": dp}
    for fam, dispatcher in cases:
        out[fam] = _train_step(hf_dirs[fam], dispatcher, batches[dp_rank::dp], tp)
    # TP=1: every rank is a DP replica training all batches (DDP's sums over identical replicas
    # divide out under the per-token loss); rank 0 reports.
    init_parallel(tp=1, ep=1)
    for fam, dispatcher in cases:
        ref = _train_step(hf_dirs[fam], dispatcher, batches, 1)
        padded = _train_step(hf_dirs[fam], dispatcher, _batches(n_batches, extra_pad=4), 1)
        if rank == 0:
            out[(fam, "ref")], out[(fam, "ref_padded")] = ref, padded
    return out


# ---- test side -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpsp")
    return {fam: make_tiny_hf(fam, str(root / fam), seed=1, tokenizer=False) for fam in (GLM, QWEN3)}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_grads(got: dict, ref: dict, what: str):
    assert set(got) == set(ref), f"{what}: parameter names differ: {set(got) ^ set(ref)}"
    nonzero = 0
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{what}: {name} gathered to {tuple(g.shape)}, TP=1 has {tuple(r.shape)}"
        if r.norm() == 0:
            assert g.norm() == 0, f"{what}: {name} has a gradient where TP=1 has none"
            continue
        nonzero += 1
        assert _rel(g, r) <= REL, f"{what}: gradient of {name} off by rel {_rel(g, r):.2e}"
    assert nonzero >= 0.9 * len(ref), f"{what}: only {nonzero}/{len(ref)} parameters got a gradient"


def _merge_grads(results, fam) -> dict:
    """Full gradients from all ranks (each rank holds its EP slice of the experts); ranks holding
    the same tensor must agree exactly (TP peers gathered the same full tensor)."""
    merged = {}
    for res in results:
        for name, g in res[fam]["grads"].items():
            if name in merged:
                assert torch.equal(merged[name], g), f"{fam}: ranks disagree on the gradient of {name}"
            else:
                merged[name] = g
    return merged


def _check_layout(results, fam, n_batches):
    ref = results[0][(fam, "ref")]
    padded = results[0][(fam, "ref_padded")]
    dp = results[0]["dp"]
    # pads reach nothing: the same batches with 4 more pad positions give the same everything
    for b, (r, p) in enumerate(zip(ref["batches"], padded["batches"])):
        assert abs(p["loss"] - r["loss"]) <= REL * abs(r["loss"]), f"{fam} batch {b}: loss changed by pads"
        assert _rel(p["group_loss"], r["group_loss"]) <= REL, f"{fam} batch {b}: group loss changed by pads"
        assert p["counters"] == r["counters"], f"{fam} batch {b}: routing counters changed by pads"
        valid = int((~_batches(n_batches)[b]["padding_mask"]).sum())
        assert all(c["tokens"] == valid for c in r["counters"].values()), f"{fam}: pads counted as tokens"
    _check_grads(padded["grads"], ref["grads"], f"{fam} TP=1 with extra pads")
    for layer, counts in ref["bias_counts"].items():
        assert torch.equal(padded["bias_counts"][layer], counts), f"{fam}: pads in expert-bias counts"

    # the layout vs TP=1, per micro-batch (DP replica d trained batches d, d+dp, ...)
    for b, r in enumerate(ref["batches"]):
        replica = [res for res in results if res["dp_rank"] == b % dp]
        got = [res[fam]["batches"][b // dp] for res in replica]
        for g in got:  # every TP rank computes the whole micro-batch's loss
            assert abs(g["loss"] - r["loss"]) <= REL * abs(r["loss"]), f"{fam} batch {b}: loss {g['loss']} vs {r['loss']}"
        group = sum(g["group_loss"] for g in got)  # each TP rank holds its tokens' share
        assert r["group_loss"].abs().sum() > 0
        assert _rel(group, r["group_loss"]) <= REL, f"{fam} batch {b}: group loss {group} vs TP=1 {r['group_loss']}"
        for layer, counters in r["counters"].items():
            summed = {k: sum(g["counters"][layer][k] for g in got) for k in counters}
            assert summed == counters, f"{fam} batch {b} layer {layer}: counters {summed} vs TP=1 {counters}"
            assert counters["null_slots"] > 0 and counters["real_assignments"] > 0
    # SP off (generation): summed over the ranks of DP replica 0, the counters are TP=1's on batch 0
    replica0 = [res for res in results if res["dp_rank"] == 0]
    for layer, counters in ref["eval_counters"].items():
        summed = {k: sum(res[fam]["eval_counters"][layer][k] for res in replica0) for k in counters}
        assert summed == counters, f"{fam} eval layer {layer}: counters {summed} vs TP=1 {counters}"
        assert all(res[fam]["eval_counters"][layer]["tokens"] == 0 for res in replica0 if res["tp_rank"] > 0)
    assert all(res[fam]["mask_slice_ok"] for res in results), f"{fam}: full padding mask cut wrongly"
    for layer, counts in ref["bias_counts"].items():
        summed = sum(res[fam]["bias_counts"][layer] for res in results)
        assert torch.equal(summed, counts), f"{fam} layer {layer}: expert-bias counts {summed} vs {counts}"
    _check_grads(_merge_grads(results, fam), ref["grads"], f"{fam}")


@pytest.fixture(scope="module")
def tp2_sp(hf_dirs):
    """2 ranks: TP=2 + SP, expert-TP 2. GLM with alltoall, Qwen3 with allgather."""
    return run_distributed(dist_layouts, 2, hf_dirs, [(GLM, "alltoall"), (QWEN3, "allgather")], 2, 1, None, 2)


@pytest.fixture(scope="module")
def tp2_ep2(hf_dirs):
    """4 ranks: TP=2 + SP x EP=2, expert-TP 1, DP 2. GLM with allgather, Qwen3 with alltoall."""
    return run_distributed(dist_layouts, 4, hf_dirs, [(GLM, "allgather"), (QWEN3, "alltoall")], 2, 2, 1, 2)


@pytest.mark.parametrize("family", [GLM, QWEN3])
def test_tp2_sp_equals_tp1(tp2_sp, family):
    _check_layout(tp2_sp, family, 2)


@pytest.mark.parametrize("family", [GLM, QWEN3])
def test_tp2_ep2_equals_tp1(tp2_ep2, family):
    _check_layout(tp2_ep2, family, 2)
