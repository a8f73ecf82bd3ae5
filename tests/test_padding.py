"""Pads never count: a right-padded batch leaves each sequence's loss, routing (recorded top-k), null
share, group loss and gradient equal to that sequence alone — stage 1 (sft with forward KL, both
model families) and stage 2 (on-policy samples of prompts of different lengths in one batch, drawn
by the trainer's KV-cached sampler, training/rollout.py, and trained with the routing it recorded
while sampling replayed).

Pad positions hold random garbage tokens and labels, so any leak (attention, router statistics,
group loss, loss) would show."""

import pytest
import torch

from dist_helpers import run_distributed

REL = 1e-5


def _routing(engine, batch):
    from trainer_fixtures import record_routing, rows_routing

    rec = record_routing(engine, [batch])[0]
    b, s = batch["tokens"].shape
    return rows_routing(rec, b, s)


def _only_row(batch, j):
    out = dict(batch)
    keep = torch.zeros_like(batch["loss_mask"])
    keep[j] = 1
    out["loss_mask"] = batch["loss_mask"] * keep
    return out


def _row(batch, j):
    return {k: v[j: j + 1] for k, v in batch.items()}


def _stage1(hf_dir, family):
    from trainer_fixtures import batch_of, make_engine, step_metrics

    engine = make_engine(hf_dir, stage="sft", kl_weight=0.5, lr=0.0)
    gen = torch.Generator().manual_seed(7)
    a = torch.randint(0, 128, (10,), generator=gen).tolist()
    b = torch.randint(0, 128, (15,), generator=gen).tolist()
    out = {"family": family}
    out["A"] = step_metrics(engine, [batch_of([a])])
    out["A_padded"] = step_metrics(engine, [batch_of([a], length=16)])
    out["B"] = step_metrics(engine, [batch_of([b])])
    ab = batch_of([a, b], length=16)
    out["AB"] = step_metrics(engine, [ab])
    out["AB_lossA"] = step_metrics(engine, [_only_row(ab, 0)])
    out["route_A"] = _routing(engine, batch_of([a]))
    out["route_B"] = _routing(engine, batch_of([b]))
    out["route_AB"] = _routing(engine, ab)
    out["n"] = (len(a) - 1, len(b) - 1)
    return out


def _stage2(hf_dir):
    from trainer_fixtures import make_engine, replay_rows, rows_routing, step_metrics

    from zeda_megatron.training.rollout import sample

    engine = make_engine(hf_dir, stage="opd", kl_weight=1.0, nll_weight=0.0, lr=0.0)
    p1, p2 = [5, 9, 11], [7, 20, 21, 22, 23, 40]

    def draw(prompts):  # greedy, as train.py samples (router replay recorded while sampling)
        r = sample(engine.student, [prompts], max_new_tokens=5, temperature=0.0, eos_id=-1, pad_id=0)
        assert r.replay is not None and len(r.batches) == len(r.replay) == 1
        return r.batches[0], r.replay[0]

    (s1, rp1), (s2, rp2), (s12, rp12) = draw([p1]), draw([p2]), draw([p1, p2])
    out = {"s1": s1, "s2": s2, "s12": s12}

    def metrics(batch, replay):
        return step_metrics(engine, [batch], replay=[replay])

    out["m1"], out["m2"], out["m12"] = metrics(s1, rp1), metrics(s2, rp2), metrics(s12, rp12)
    # p1's sequence padded to the joint length
    out["m1_padded"] = metrics(_row(s12, 0), replay_rows(rp12, 2, slice(0, 1)))
    out["m12_loss1"] = metrics(_only_row(s12, 0), rp12)
    # routing recorded while sampling (what the training forward replays) and a free forward's
    out["replay_1"] = rows_routing(rp1, 1, s1["tokens"].shape[1])
    out["replay_2"] = rows_routing(rp2, 1, s2["tokens"].shape[1])
    out["replay_12"] = rows_routing(rp12, 2, s12["tokens"].shape[1])
    out["route_1"], out["route_2"], out["route_12"] = _routing(engine, s1), _routing(engine, s2), _routing(engine, s12)
    return out


def _worker(rank, world, hf_qwen, hf_glm):
    from zeda_megatron.distributed import init_parallel

    init_parallel()
    return {"stage1": [_stage1(hf_qwen, "qwen3"), _stage1(hf_glm, "glm")], "stage2": _stage2(hf_qwen)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from bridge_fixtures import make_tiny_hf

    root = tmp_path_factory.mktemp("pad")
    qwen = make_tiny_hf("qwen3_moe", str(root / "qwen"), seed=0)
    glm = make_tiny_hf("glm4_moe_lite", str(root / "glm"), seed=0)
    return run_distributed(_worker, 1, qwen, glm)[0]


KEYS = ("loss", "nll", "kl", "grad_norm", "group_loss", "null_share")


def _same(x, y, keys=KEYS, tag=""):
    assert x["tokens"] == y["tokens"], tag
    assert x["null_slots"] == y["null_slots"] and x["routed_slots"] == y["routed_slots"], (tag, x, y)
    for k in keys:
        assert x[k] == pytest.approx(y[k], rel=REL, abs=1e-7), (tag, k, x[k], y[k])


def _loss_sum(m):
    return m["loss"] * m["tokens"]


@pytest.mark.parametrize("family", [0, 1], ids=["qwen3", "glm"])
def test_stage1_padding_changes_nothing(results, family):
    r = results["stage1"][family]
    assert r["A"]["null_slots"] > 0 and r["A"]["group_loss"] > 0 and r["A"]["kl"] > 0  # the checks can bite
    # one sequence, padded with garbage: every number equal to the sequence alone
    _same(r["A"], r["A_padded"], tag="A vs A padded")
    # two sequences in one padded batch: per-sequence loss and routing as alone, counters add up
    assert r["AB"]["tokens"] == r["A"]["tokens"] + r["B"]["tokens"]
    assert _loss_sum(r["AB"]) == pytest.approx(_loss_sum(r["A"]) + _loss_sum(r["B"]), rel=REL)
    assert r["AB"]["null_slots"] == r["A"]["null_slots"] + r["B"]["null_slots"]
    assert r["AB"]["routed_slots"] == r["A"]["routed_slots"] + r["B"]["routed_slots"]
    for k in ("loss", "nll", "kl"):
        assert r["AB_lossA"][k] == pytest.approx(r["A"][k], rel=REL), k
    na, nb = r["n"]
    for la, lb, lab in zip(r["route_A"], r["route_B"], r["route_AB"]):
        assert torch.equal(lab[0, :na], la[0]) and torch.equal(lab[1, :nb], lb[0])


def test_stage2_padding_changes_nothing(results):
    r = results["stage2"]
    s1, s2, s12 = r["s1"], r["s2"], r["s12"]
    n1, n2 = s1["tokens"].shape[1], s2["tokens"].shape[1]
    assert n1 == 3 - 1 + 5 and n2 == 6 - 1 + 5 and s12["tokens"].shape[1] == n2
    # sampling p1 beside a longer prompt gives p1 the same tokens (greedy), then pads
    for k in ("tokens", "labels", "loss_mask"):
        assert torch.equal(s12[k][0, :n1], s1[k][0]), k
        assert torch.equal(s12[k][1], s2[k][0]), k
    # rollout's padding_mask is True from each row's last token on: row j's inputs are its own
    # tokens[:real_len-1] (the last token is only a label); a row that fills S has no pads
    assert s12["padding_mask"][0].tolist() == [False] * n1 + [True] * (n2 - n1)
    assert not s12["padding_mask"][1].any() and s12["loss_mask"][0, n1:].sum() == 0
    assert not s1["padding_mask"].any() and not s2["padding_mask"].any()
    assert s1["loss_mask"][0].tolist() == [0, 0] + [1] * 5  # label t is token t+1: the 5 sampled ones
    m1, m2, m12 = r["m1"], r["m2"], r["m12"]
    assert m1["kl"] > 0 and m1["null_slots"] > 0
    _same(m1, r["m1_padded"], tag="p1 vs p1 padded")
    assert m12["tokens"] == m1["tokens"] + m2["tokens"]
    assert _loss_sum(m12) == pytest.approx(_loss_sum(m1) + _loss_sum(m2), rel=REL)
    assert m12["null_slots"] == m1["null_slots"] + m2["null_slots"]
    assert m12["routed_slots"] == m1["routed_slots"] + m2["routed_slots"]
    assert r["m12_loss1"]["kl"] == pytest.approx(m1["kl"], rel=REL)
    assert len(r["replay_1"]) == len(r["route_1"]) > 0
    for key in ("replay", "route"):
        for l1, l2, l12 in zip(r[f"{key}_1"], r[f"{key}_2"], r[f"{key}_12"]):
            assert torch.equal(l12[0, :n1], l1[0]) and torch.equal(l12[1], l2[0]), key
    # the routing replayed in training is the routing a free forward over the samples chooses (fp32)
    for a, b in zip(r["replay_12"], r["route_12"]):
        assert torch.equal(a[0, :n1], b[0, :n1]) and torch.equal(a[1], b[1])
