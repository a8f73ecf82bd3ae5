"""Expert parallelism on gloo: EP = 1, 2 and 4 give the single-process outputs and gradients, and the
all-to-all carries exactly the real assignments."""

import pytest
import torch

from dist_helpers import run_distributed
from moe_fixtures import build_null, make_config
from zeda_megatron.mcore.config import NullExpertSettings

E, Z, K, S, B = 8, 8, 4, 5, 2
NULL = NullExpertSettings(Z, null_weight=2.0)


def _case_config(case):
    kind, dispatcher, shared = case
    return make_config(kind=kind, dispatcher=dispatcher, shared=shared,
                       balancing="grouped_aux_loss", coeff=0.1)


def _full_weights(config, seed=7):
    """Weights of all E experts + router (+ shared), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    w = {"router.weight": torch.randn(E + Z, 16, generator=g)}
    for e in range(E):
        w[f"fc1.{e}"] = torch.randn(2 * config.moe_ffn_hidden_size, 16, generator=g) * 0.3
        w[f"fc2.{e}"] = torch.randn(16, config.moe_ffn_hidden_size, generator=g) * 0.3
    if config.moe_shared_expert_intermediate_size:
        f = config.moe_shared_expert_intermediate_size
        w["shared_experts.linear_fc1.weight"] = torch.randn(2 * f, 16, generator=g) * 0.3
        w["shared_experts.linear_fc2.weight"] = torch.randn(16, f, generator=g) * 0.3
    if config.moe_router_enable_expert_bias:
        w["router.expert_bias"] = torch.randn(E, generator=g) * 0.1
        w["router.null_expert_bias"] = torch.randn(Z, generator=g) * 0.1
    return w


def _load(layer, w):
    sd = layer.state_dict()
    for i, e in enumerate(layer.local_expert_indices):
        sd[f"experts.local_experts.{i}.linear_fc1.weight"] = w[f"fc1.{e}"]
        sd[f"experts.local_experts.{i}.linear_fc2.weight"] = w[f"fc2.{e}"]
    for k, v in w.items():
        if not k.startswith("fc"):
            sd[k] = v
    layer.load_state_dict(sd)


def _inputs(world):
    return torch.randn(world, S, B, 16, generator=torch.Generator().manual_seed(11))


def _step(layer, x):
    layer.train()
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    experts = {
        e: (m.linear_fc1.weight.grad.clone(), m.linear_fc2.weight.grad.clone())
        for e, m in zip(layer.local_expert_indices, layer.experts.local_experts)
    }
    return out.detach(), x.grad, layer.router.weight.grad.clone(), experts


def _worker(rank, world, cases):
    from zeda_megatron.distributed import init_parallel

    results = []
    for case, ep in cases:
        init_parallel(ep=ep)
        config = _case_config(case)
        layer = build_null(config, NULL)
        _load(layer, _full_weights(config))
        out, gx, grouter, gexperts = _step(layer, _inputs(world)[rank])
        results.append(dict(out=out, gx=gx, grouter=grouter, gexperts=gexperts, stats=layer.routing_stats(),
                            num_local=layer.num_local_experts))
    return results


def _reference(case, world):
    """One process holding all E experts runs each rank's micro-batch; grads accumulate as DDP would."""
    from zeda_megatron.distributed import init_parallel

    init_parallel()
    config = _case_config(case)
    layer = build_null(config, NULL)
    _load(layer, _full_weights(config))
    outs, gxs, stats = [], [], []
    for r in range(world):
        layer.zero_grad()
        layer.reset_routing_stats()
        out, gx, grouter, gexp = _step(layer, _inputs(world)[r])
        outs.append(out)
        gxs.append(gx)
        stats.append(layer.routing_stats())
        acc = (grouter, gexp) if r == 0 else (acc[0] + grouter, {e: (acc[1][e][0] + g[0], acc[1][e][1] + g[1]) for e, g in gexp.items()})
    return outs, gxs, acc[0], acc[1], stats


def _check(world, cases, results):
    close = dict(rtol=1e-5, atol=1e-6)
    for i, (case, ep) in enumerate(cases):
        outs, gxs, grouter, gexperts, ref_stats = _reference(case, world)
        per_rank = [r[i] for r in results]
        for rank, res in enumerate(per_rank):
            assert res["num_local"] == E // ep
            torch.testing.assert_close(res["out"], outs[rank], **close)
            torch.testing.assert_close(res["gx"], gxs[rank], **close)
            s = res["stats"]
            assert s["null_slots"] == ref_stats[rank]["null_slots"] and s["tokens"] == S * B
            if case[1] == "alltoall":
                assert s["rows_sent"] == s["real_assignments"] == S * B * K - s["null_slots"]
            else:
                assert s["rows_sent"] == S * B
        # Each replica of an expert sees the tokens of its EP group; summed over replicas (what
        # the expert-data-parallel gradient all-reduce does) they equal the single-process grads.
        for e in range(E):
            replicas = [r["gexperts"][e] for r in per_rank if e in r["gexperts"]]
            assert len(replicas) == world // ep
            torch.testing.assert_close(sum(g[0] for g in replicas), gexperts[e][0], **close)
            torch.testing.assert_close(sum(g[1] for g in replicas), gexperts[e][1], **close)
        torch.testing.assert_close(sum(r["grouter"] for r in per_rank), grouter, **close)
        assert sum(r["stats"]["null_slots"] for r in per_rank) > 0


CASES_2 = [
    (("softmax", "alltoall", False), 1),
    (("softmax", "alltoall", False), 2),
    (("sigmoid", "alltoall", True), 2),
    (("sigmoid", "allgather", True), 2),
]
CASES_4 = [
    (("softmax", "alltoall", True), 4),
    (("sigmoid", "alltoall", False), 4),
]


@pytest.mark.parametrize("world, cases", [(2, CASES_2), (4, CASES_4)], ids=["world2_ep1_ep2", "world4_ep4"])
def test_expert_parallel_matches_single_process(world, cases):
    results = run_distributed(_worker, world, cases)
    _check(world, cases, results)
