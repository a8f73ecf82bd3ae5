"""Pure routing functions: semantics of the reference release, the group loss and its equilibrium."""

import pytest
import torch

from zeda_megatron import routing
from zeda_megatron.routing import group_balance_loss, route, routing_scores, target_null_share

E, Z, K, T = 8, 4, 4, 64


def _mcore_route(logits, num_real, **kw):
    """megatron-core's own top-k over all E+Z columns, then the real columns."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    probs, rmap = topk_routing_with_score_function(logits, **kw)
    return probs[:, :num_real], rmap[:, :num_real], rmap[:, num_real:].sum(-1)


CASES = {
    "softmax_norm": dict(score_function="softmax", normalize_topk=True),
    "softmax_presoftmax": dict(score_function="softmax", normalize_topk=False),
    "sigmoid_bias_scale": dict(score_function="sigmoid", bias=True, scaling_factor=1.8),
    "sigmoid_groups": dict(score_function="sigmoid", bias=True, scaling_factor=2.5, num_groups=4, group_topk=2),
    "softmax_groups": dict(score_function="softmax", num_groups=3, group_topk=2),
}


@pytest.mark.parametrize("case", CASES)
def test_route_matches_megatron_core_bitwise(case):
    kw = dict(CASES[case])
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E + Z, generator=g)
    bias = torch.randn(E + Z, generator=g) * 0.1 if kw.pop("bias", False) else None
    normalize = kw.pop("normalize_topk", True)
    probs, rmap, null_slots = route(logits, num_real=E, topk=K, expert_bias=bias, normalize_topk=normalize, **kw)
    ref = _mcore_route(logits, E, topk=K, expert_bias=bias, use_pre_softmax=not normalize, **kw)
    assert torch.equal(probs, ref[0]) and torch.equal(rmap, ref[1]) and torch.equal(null_slots, ref[2])
    assert probs.shape == (T, E) and rmap.dtype == torch.bool
    assert (rmap.sum(-1) + null_slots == K).all()


def test_null_mass_is_dropped_not_renormalised():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(T, E + Z, generator=g)
    probs, rmap, null_slots = route(logits, num_real=E, topk=K, score_function="softmax")
    # softmax over the K chosen: the real share of each token is its real weights' sum < 1
    full = torch.softmax(logits.topk(K, dim=-1).values, dim=-1)
    idx = logits.topk(K, dim=-1).indices
    expected_real_mass = (full * (idx < E)).sum(-1)
    torch.testing.assert_close(probs.sum(-1), expected_real_mass)
    assert (probs.sum(-1)[null_slots > 0] < 1 - 1e-6).all()
    assert (null_slots > 0).any() and (null_slots == 0).any()
    # sigmoid: weights normalised over K slots (nulls included), then scaled
    probs_s, _, ns = route(logits, num_real=E, topk=K, score_function="sigmoid", scaling_factor=1.8)
    assert (probs_s.sum(-1) <= 1.8 + 1e-5).all() and (probs_s.sum(-1)[ns > 0] < 1.8 - 1e-6).all()


def test_z0_and_masked_nulls_equal_the_original_routing():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    for kind, b in (("softmax", None), ("sigmoid", bias)):
        orig = route(real, num_real=E, topk=K, score_function=kind, expert_bias=b)
        masked = torch.cat([real, torch.full((T, Z), float("-inf"))], dim=-1)
        b_full = None if b is None else torch.cat([b, torch.full((Z,), float("-inf"))])
        got = route(masked, num_real=E, topk=K, score_function=kind, expert_bias=b_full)
        for a, c in zip(orig, got):
            assert torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(topk=E + Z + 1), "topk"),
        (dict(num_real=E + Z + 1), "num_real"),
        (dict(num_groups=5, group_topk=1), "divide E\\+Z"),
        (dict(num_groups=4), "together"),
        (dict(expert_bias=torch.zeros(E), score_function="sigmoid"), "expert_bias"),
        (dict(score_function="relu"), "score_function"),
    ],
)
def test_route_rejects_bad_arguments(kwargs, match):
    args = dict(num_real=E, topk=K)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        route(torch.randn(4, E + Z), **args)


def _loss_by_hand(scores, rmap, num_real, topk, w, coeff):
    t = scores.shape[0]
    f = rmap.float().sum(0)
    p = scores.sum(0)
    zc = scores.shape[1] - num_real
    fe, fz = f[:num_real].sum() / (topk * t), f[num_real:].sum() / (topk * t)
    pe, pz = p[:num_real].sum() / t, p[num_real:].sum() / t
    return coeff * (num_real + w * zc) * (fe * pe / num_real + fz * pz / (w * zc))


def test_group_balance_loss_matches_formula_and_is_differentiable():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(T, E + Z, generator=g, dtype=torch.float64, requires_grad=True)
    scores = routing_scores(logits, "softmax")
    rmap = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(K, -1).indices, True)
    loss = group_balance_loss(scores, rmap, num_real=E, topk=K, zero_weight=2.0, coeff=0.1)
    torch.testing.assert_close(loss, _loss_by_hand(scores, rmap, E, K, 2.0, 0.1))
    # the form: coeff*(E+wZ)/(K*T^2)*(F_E*S_E/E + F_Z*S_Z/(wZ))
    f_e, f_z = rmap[:, :E].sum(), rmap[:, E:].sum()
    s_e, s_z = scores[:, :E].sum(), scores[:, E:].sum()
    formula = 0.1 * (E + 2 * Z) / (K * T**2) * (f_e * s_e / E + f_z * s_z / (2 * Z))
    torch.testing.assert_close(loss, formula)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.autograd.gradcheck(
        lambda s: group_balance_loss(s, rmap, num_real=E, topk=K, zero_weight=2.0, coeff=0.1),
        (scores.detach().requires_grad_(),),
    )
    with pytest.raises(ValueError, match="null experts"):
        group_balance_loss(scores[:, :E], rmap[:, :E], num_real=E, topk=K, zero_weight=1.0, coeff=0.1)


@pytest.mark.parametrize("kind, w", [("softmax", 1.0), ("softmax", 2.0), ("sigmoid", 2.0)])
def test_group_loss_alone_drives_null_share_to_target(kind, w):
    torch.manual_seed(0)
    e, z, k, h = 16, 8, 4, 32
    target = target_null_share(e, z, w)
    x = torch.randn(512, h)
    router = torch.nn.Linear(h, e + z, bias=False)
    with torch.no_grad():  # start far from the target: null rows strongly disfavoured
        router.weight[e:] -= 1.0 * x.mean(0) / x.mean(0).norm() * 3
    opt = torch.optim.Adam(router.parameters(), lr=0.05)

    def null_share():
        with torch.no_grad():
            logits = router(x)
            scores = routing_scores(logits, kind)
            return (scores.topk(k, -1).indices >= e).float().mean().item()

    start = null_share()
    for _ in range(300):
        logits = router(x)
        scores = routing_scores(logits, kind)
        rmap = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, -1).indices, True)
        loss = group_balance_loss(scores, rmap, num_real=e, topk=k, zero_weight=w, coeff=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = null_share()
    assert abs(end - target) < 0.5 * abs(start - target), (start, end, target)
    assert abs(end - target) < 0.1, (start, end, target)


def test_share_helpers():
    assert target_null_share(64, 32, 2.0) == pytest.approx(0.5)
    assert target_null_share(128, 64, 1.0) == pytest.approx(1 / 3)
    w = routing.zero_weight_for_share(0.5, 64, 32)
    assert w == pytest.approx(2.0) and target_null_share(64, 32, w) == pytest.approx(0.5)
    assert routing.num_null_from_ratio(64, 0.5) == 32
    with pytest.raises(ValueError, match="whole number"):
        routing.num_null_from_ratio(10, 0.25)
