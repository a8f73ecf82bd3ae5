"""Tensor + sequence parallelism in the trainer (CPU/gloo): the same global batches under TP=1 (DP=4),
TP=2+SP (DP=2) and TP=2+SP x EP=2 give stage 1's first three losses, grad norms, group losses and
null shares equal to TP=1's (fp32, rel 1e-5), for tiny GLM (MLA) and tiny Qwen3 models; stage 2
(greedy on-policy samples from the trainer's KV-cached sampler, training/rollout.py, with the routing
recorded while sampling replayed; reverse KL) trains under both TP layouts and matches TP=1 too.

One 4-rank job runs every layout in turn (the model-parallel groups are rebuilt in the same
process group). Batch rows have different lengths (right padding) and an odd length (the step pads
to a multiple of TP), so padding under SP is exercised as well.

The group balance loss is a statistic of each DP replica's micro-batch, so the layouts must group
the rows alike: under TP=2 ranks (0, 1) and (2, 3) are the two DP replicas, each with two rows; the
TP=1 reference (DP=4) gives ranks 0 and 1 both replica 0's rows (and 2, 3 replica 1's). Duplicated
rows leave every mean (loss, gradient, group loss, null share) as it is; token counts double."""

import pytest
import torch

from dist_helpers import run_distributed

LAYOUTS = {"tp1": dict(tp=1, ep=1), "tp2": dict(tp=2, ep=1), "tp2ep2": dict(tp=2, ep=2)}
GLOBAL_ROWS = 4
REL = 1e-5


def _global_batch(step: int):
    """4 rows of different lengths, right-padded to the odd length 15."""
    from trainer_fixtures import batch_of

    gen = torch.Generator().manual_seed(100 + step)
    seqs = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (16, 11, 9, 14)]
    return batch_of(seqs, length=15, prompt_lens=[1, 3, 2, 1])


REPLICAS = 2  # DP replicas of the TP=2 layouts


def _rows(batch, replica):
    per = GLOBAL_ROWS // REPLICAS
    return {k: v[replica * per:(replica + 1) * per] for k, v in batch.items()}


PROMPTS = [[5, 9, 11], [7, 20, 21, 22, 23], [40, 41], [3, 60, 61, 62]]


def _run_layout(hf_dir, tp, ep):
    from megatron.core import parallel_state as ps
    from trainer_fixtures import make_engine, step_metrics

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training.rollout import sample

    import torch.distributed as dist

    init_parallel(tp=tp, ep=ep)
    replica = dist.get_rank() // 2  # = the DP rank under TP=2; TP=1 duplicates it (see above)
    assert tp == 1 or ps.get_data_parallel_rank() == replica
    out = {"stage1": [], "stage2": []}
    engine = make_engine(hf_dir, stage="sft", kl_weight=0.5, lr=1e-3, router_replay=False,
                         sequence_parallel=tp > 1, bias_update=True)
    for step in range(3):
        out["stage1"].append(step_metrics(engine, [_rows(_global_batch(step), replica)]))
        if step == 0:
            out["grad_norms"] = _param_grad_norms(engine)
    del engine
    engine = make_engine(hf_dir, stage="opd", kl_weight=1.0, nll_weight=0.0, lr=1e-3, router_replay=True,
                         sequence_parallel=tp > 1)
    per = GLOBAL_ROWS // REPLICAS
    prompts = [PROMPTS[replica * per:(replica + 1) * per]]
    for step in range(2):
        r = sample(engine.student, prompts, max_new_tokens=4, temperature=0.0, eos_id=-1, pad_id=0)
        assert r.replay is not None
        m = step_metrics(engine, r.batches, replay=r.replay)
        m["sampled"], m["length"] = r.responses[0], r.batches[0]["tokens"].shape[1]
        out["stage2"].append(m)
    return out


def _param_grad_norms(engine) -> dict:
    """Each student parameter's gradient norm after the step (TP-sharded ones over the TP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    norms = {}
    for name, p in engine.student.named_parameters():
        sq = p.main_grad.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
        norms[name] = sq.sqrt().item()
    return norms


def _worker(rank, world, hf_dirs):
    results = {}
    for family, hf_dir in hf_dirs.items():
        for name, layout in LAYOUTS.items():
            results[(family, name)] = _run_layout(hf_dir, **layout)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from bridge_fixtures import make_tiny_hf

    root = tmp_path_factory.mktemp("tp")
    dirs = {"qwen3": make_tiny_hf("qwen3_moe", str(root / "qwen"), seed=0),
            "glm": make_tiny_hf("glm4_moe_lite", str(root / "glm"), seed=0)}
    return run_distributed(_worker, 4, dirs)


@pytest.mark.parametrize("layout", ["tp2", "tp2ep2"])
@pytest.mark.parametrize("family", ["qwen3", "glm"])
def test_stage1_tp_sp_equals_tp1(results, family, layout):
    ref, got = results[0][(family, "tp1")]["stage1"], results[0][(family, layout)]["stage1"]
    assert len(ref) == len(got) == 3
    assert ref[0]["group_loss"] > 0 and ref[0]["null_share"] > 0 and ref[0]["kl"] > 0
    assert ref[2]["loss"] != ref[0]["loss"]  # the steps do move the weights
    for step, (a, b) in enumerate(zip(ref, got)):
        assert a["tokens"] == 2 * b["tokens"]  # the reference counts every row twice
        for key in ("loss", "nll", "kl", "grad_norm", "group_loss", "null_share"):
            assert b[key] == pytest.approx(a[key], rel=REL, abs=1e-7), (family, layout, step, key, a[key], b[key])
    # every rank reports the same global numbers
    for r in results[1:]:
        assert r[(family, layout)]["stage1"][0]["loss"] == got[0]["loss"]


@pytest.mark.parametrize("family", ["qwen3", "glm"])
def test_per_parameter_gradients_tp2_sp_equal_tp1(results, family):
    """Through the trainer (null experts, group loss, forward KL, padding), every parameter's gradient
    norm at TP=2+SP (sharded ones gathered over TP) equals TP=1's."""
    for r in results:
        ref, got = r[(family, "tp1")]["grad_norms"], r[(family, "tp2")]["grad_norms"]
        assert ref.keys() == got.keys() and len(ref) > 20
        assert sum(v > 0 for v in ref.values()) > 20
        for name in ref:
            assert got[name] == pytest.approx(ref[name], rel=REL, abs=1e-8), (family, name, ref[name], got[name])


@pytest.mark.parametrize("layout", ["tp2", "tp2ep2"])
@pytest.mark.parametrize("family", ["qwen3", "glm"])
def test_stage2_trains_under_tp_sp(results, family, layout):
    ref, got = results[0][(family, "tp1")]["stage2"], results[0][(family, layout)]["stage2"]
    for step, (a, b) in enumerate(zip(ref, got)):
        assert b["kl"] > 0 and 2 * b["tokens"] == a["tokens"] == 2 * GLOBAL_ROWS * 4
        assert torch.isfinite(torch.tensor(b["grad_norm"])) and b["grad_norm"] > 0
    # greedy samples: the same tokens as TP=1 (decoded with SP off, trained at a length padded to a
    # multiple of TP), so the same losses
    for rank, r in enumerate(results):
        for step in range(2):
            a, b = r[(family, "tp1")]["stage2"][step], r[(family, layout)]["stage2"][step]
            assert b["sampled"] == a["sampled"] and all(len(x) == 4 for x in a["sampled"])
            assert b["length"] % 2 == 0 and b["length"] - a["length"] in (0, 1)
    for step, (a, b) in enumerate(zip(ref, got)):
        for key in ("loss", "kl", "grad_norm", "group_loss", "null_share"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (family, layout, step, key, a[key], b[key])


def test_job_runs_tp2_sp_from_the_command_line(tmp_path):
    """python -m zeda_megatron.train with parallel.tp=2 parallel.sequence_parallel=true under torchrun:
    stage 1 equals the one-process run (same rows per DP replica), stage 2 trains."""
    import json

    from test_train import metrics, train

    args = ("model=tiny_glm", "stage=sft", "trainer.max_steps=3", "trainer.global_batch_size=2",
            "stage.kl_weight=0.5", "model.group_loss_coeff=0.1", "trainer.verify_teacher=false")
    tp = ("parallel.tp=2", "parallel.sequence_parallel=true")
    train(1, tmp_path / "tp1", *args)
    train(2, tmp_path / "tp2", *args, *tp)
    for a, b in zip(metrics(tmp_path / "tp1"), metrics(tmp_path / "tp2")):
        for key in ("loss", "nll", "kl", "grad_norm", "group_loss", "null_share"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key, a[key], b[key])
    train(2, tmp_path / "opd", "model=tiny_glm", "stage=opd", "trainer.max_steps=2", "trainer.global_batch_size=2",
          "stage.max_new_tokens=5", f"model.init_checkpoint={tmp_path / 'tp2'}/checkpoints", *tp)
    rows = metrics(tmp_path / "opd")
    assert len(rows) == 2 and all(r["kl"] > 0 and r["tokens"] > 0 for r in rows)
    assert json.load(open(tmp_path / "opd" / "summary.json"))["steps_done"] == 2
