"""NullExpertMoELayer in one process: exactness against stock megatron-core and a plain-torch
reference, masking, counters, expert-bias update, group loss plumbing, specs, config errors."""

import pytest
import torch

from moe_fixtures import (
    build_null,
    build_stock,
    expert_weights,
    make_config,
    randomize_,
    reference_forward,
)
from zeda_megatron.mcore.config import NullExpertSettings

E, Z, K = 8, 4, 4


@pytest.fixture(scope="module", autouse=True)
def parallel():
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    init_parallel()
    yield
    destroy_parallel()


def _run(layer, x, train=True):
    layer.train(train)
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _x(seed=0, s=6, b=3):
    return torch.randn(s, b, 16, generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "softmax": dict(kind="softmax"),
    "softmax_presoftmax_auxloss": dict(kind="softmax", moe_router_pre_softmax=True, balancing="aux_loss", coeff=0.01),
    "sigmoid_shared_groups": dict(kind="sigmoid", shared=True, groups=(4, 2), balancing="seq_aux_loss", coeff=1e-3),
    "sigmoid_allgather_zloss": dict(kind="sigmoid", dispatcher="allgather", moe_z_loss_coeff=1e-3),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_z0_equals_stock_moe_layer(case):
    config = make_config(**CONFIGS[case])
    stock, null = build_stock(config), build_null(config, NullExpertSettings(0))
    randomize_(stock)
    assert null.load_state_dict(stock.state_dict(), strict=True) is not None
    x = _x()
    out_s, gx_s, g_s = _run(stock, x)
    out_n, gx_n, g_n = _run(null, x)
    assert torch.equal(out_s, out_n) and torch.equal(gx_s, gx_n)
    assert g_s.keys() == g_n.keys() and all(torch.equal(g_s[k], g_n[k]) for k in g_s)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shared", [False, True])
def test_output_equals_plain_reference_over_real_experts(kind, shared):
    config = make_config(kind=kind, shared=shared, groups=(4, 2) if kind == "sigmoid" else None)
    layer = build_null(config, NullExpertSettings(Z))
    randomize_(layer, seed=1, bias_scale=0.3)
    x = _x(1)
    out, gx, grads = _run(layer, x)
    xr = x.clone().requires_grad_(True)
    sh = (layer.shared_experts.linear_fc1.weight, layer.shared_experts.linear_fc2.weight) if shared else None
    ref, rmap, null_slots = reference_forward(
        xr, layer.router.weight, expert_weights(layer), config, E, layer.router.full_expert_bias(), sh
    )
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    assert (null_slots > 0).any(), "test routing should pick some null slots"
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-6)
    stats = layer.routing_stats()
    assert stats["null_slots"] == int(null_slots.sum()) and stats["real_assignments"] == int(rmap.sum())


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_masked_null_logits_give_the_original_layer(kind):
    config = make_config(kind=kind, shared=kind == "sigmoid")
    stock = build_stock(config)
    randomize_(stock, seed=2)
    masked = build_null(config, NullExpertSettings(Z, mask_null_experts=True))
    sd = dict(stock.state_dict())
    g = torch.Generator().manual_seed(5)
    sd["router.weight"] = torch.cat([sd["router.weight"], 5 * torch.randn(Z, 16, generator=g)])
    if kind == "sigmoid":  # huge null bias: would win every slot if masking ignored the bias
        sd["router.null_expert_bias"] = torch.full((Z,), 100.0)
    masked.load_state_dict(sd)
    x = _x(2)
    out_s, gx_s, g_s = _run(stock, x)
    out_m, gx_m, g_m = _run(masked, x)
    assert torch.equal(out_s, out_m) and torch.equal(gx_s, gx_m)
    assert torch.equal(g_s["router.weight"], g_m["router.weight"][:E])
    assert not g_m["router.weight"][E:].any()
    assert masked.routing_stats()["null_slots"] == 0


def test_rows_sent_equal_real_assignments_and_all_null_tokens_are_not_sent():
    config = make_config(kind="softmax")
    layer = build_null(config, NullExpertSettings(Z))
    randomize_(layer, seed=3)
    x = _x(3, s=5, b=2)
    with torch.no_grad():  # make token (0, 0) pick null experts in all K slots
        layer.router.weight[E:] = 50 * x[0, 0] / x[0, 0].norm()
    layer.eval()
    with torch.no_grad():
        layer(x)
    stats = layer.routing_stats()
    tokens = x.shape[0] * x.shape[1]
    assert stats["tokens"] == tokens
    assert stats["rows_sent"] == stats["real_assignments"] == tokens * K - stats["null_slots"]
    logits = x[0, 0] @ layer.router.weight.t()
    assert (logits.topk(K).indices >= E).all(), "token (0,0) should route only to null experts"
    assert stats["rows_sent"] <= (tokens - 1) * K
    layer.reset_routing_stats()
    assert layer.routing_stats()["rows_sent"] == 0 and layer.routing_stats()["tokens"] == 0


def test_builtin_expert_bias_update_leaves_null_bias_alone():
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    config = make_config(kind="sigmoid")
    layer = build_null(config, NullExpertSettings(Z))
    randomize_(layer, seed=4)
    null_before = layer.router.null_expert_bias.clone()
    real_before = layer.router.expert_bias.clone()
    assert real_before.shape == (E,) and null_before.shape == (Z,)
    _run(layer, _x(4))
    counts = layer.router.local_tokens_per_expert.clone()
    assert counts.shape == (E,) and counts.sum() == layer.routing_stats()["real_assignments"]
    _update_router_expert_bias([layer], config, parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
    assert torch.equal(layer.router.null_expert_bias, null_before)
    step = torch.sign(counts.mean() - counts) * config.moe_router_bias_update_rate
    torch.testing.assert_close(layer.router.expert_bias, real_before + step)


def test_group_loss_is_attached_and_logged_per_layer():
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from zeda_megatron.routing import group_balance_loss, routing_scores

    config = make_config(kind="softmax", balancing=["aux_loss", "grouped_aux_loss"], coeff=[0.0, 0.1])
    layer = build_null(config, NullExpertSettings(Z, null_weight=2.0))
    layer.set_layer_number(1)
    randomize_(layer, seed=6)
    assert layer.router.is_aux_loss_enabled()
    tracker = get_moe_metrics_tracker()
    tracker.metrics.clear()
    layer.train()
    x = _x(6)
    out, _ = layer(x)
    out.sum().backward()
    g_with = layer.router.weight.grad.clone()
    logged = tracker.metrics["grouped_load_balancing_loss"].values[0]
    scores = routing_scores(x.view(-1, 16) @ layer.router.weight.detach().t(), "softmax")
    rmap = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(K, -1).indices, True)
    expected = group_balance_loss(scores, rmap, num_real=E, topk=K, zero_weight=2.0, coeff=0.1) / 0.1
    torch.testing.assert_close(logged, expected)
    # the loss reaches the router: its gradient differs from a run without the loss by exactly
    # d(L_GA)/dW (the aux-loss scale defaults to 1)
    layer0 = build_null(make_config(kind="softmax"), NullExpertSettings(Z))
    layer0.load_state_dict(layer.state_dict())
    layer0.train()
    out0, _ = layer0(x)
    out0.sum().backward()
    w = layer.router.weight.detach().clone().requires_grad_(True)
    s = routing_scores(x.view(-1, 16) @ w.t(), "softmax")
    group_balance_loss(s, rmap, num_real=E, topk=K, zero_weight=2.0, coeff=0.1).backward()
    torch.testing.assert_close(g_with - layer0.router.weight.grad, w.grad, rtol=1e-4, atol=5e-6)


def test_spec_helper_builds_dense_plus_moe_gpt_models():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import MLATransformerConfig

    from zeda_megatron.mcore.specs import gpt_block_spec, moe_layers, routing_stats, settings_from

    null = settings_from(E, null_ratio=0.5, null_weight=2.0)
    assert null.num_null_experts == 4
    base = make_config(kind="sigmoid", shared=True, num_layers=3, moe_layer_freq=[0, 1, 1], normalization="RMSNorm",
                       qk_layernorm=True, num_query_groups=1, kv_channels=8)
    for config in (base, MLATransformerConfig(**{
        **{k: getattr(base, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
           "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_token_dispatcher_type",
           "add_bias_linear", "gated_linear_unit", "activation_func", "moe_router_dtype", "moe_layer_freq",
           "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
           "moe_shared_expert_intermediate_size", "normalization", "use_cpu_initialization",
           "moe_permute_fusion", "gradient_accumulation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
           "apply_rope_fusion", "persist_layer_norm", "bias_activation_fusion")},
        "q_lora_rank": 12, "kv_lora_rank": 8, "qk_head_dim": 6, "qk_pos_emb_head_dim": 4, "v_head_dim": 10,
        "qk_layernorm": True, "rope_type": "rope"})):
        model = GPTModel(config, gpt_block_spec(config, null), vocab_size=32, max_sequence_length=16)
        assert len(moe_layers(model)) == 2
        tokens = torch.randint(0, 32, (2, 7))
        pos = torch.arange(7).unsqueeze(0).expand(2, -1)
        model.train()
        logits = model(tokens, pos, attention_mask=None)
        assert logits.shape == (2, 7, 32)
        logits.float().mean().backward()
        stats = routing_stats(model)
        assert set(stats["layers"]) == {2, 3} and stats["tokens"] == 2 * 14
        assert 0 < stats["null_share"] < 1


@pytest.mark.parametrize(
    "null, cfg, match",
    [
        (dict(num_null_experts=-1), {}, "num_null_experts"),
        (dict(num_null_experts=1), dict(topk=E + 2), "moe_router_topk"),
        (dict(num_null_experts=3), dict(groups=(4, 2)), "moe_router_num_groups"),
        (dict(num_null_experts=4), dict(dispatcher="flex"), "moe_token_dispatcher_type"),
        (dict(num_null_experts=0), dict(balancing="grouped_aux_loss", coeff=0.1), "grouped_aux_loss"),
        (dict(num_null_experts=4), dict(moe_expert_capacity_factor=1.0), "capacity"),
    ],
)
def test_bad_configuration_is_rejected_with_the_fix(null, cfg, match):
    with pytest.raises(ValueError, match=match):
        build_null(make_config(**cfg), NullExpertSettings(**null))


def test_ep_must_divide_real_experts():
    from zeda_megatron.mcore.config import validate

    with pytest.raises(ValueError, match="expert parallel size 3 must divide num_moe_experts=8"):
        validate(make_config(), NullExpertSettings(4), ep_size=3)
