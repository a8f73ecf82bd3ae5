"""trainer.keep_checkpoints: after each save the older iter_* folders are deleted (rank 0, once the
``latest`` marker names the new one), keeping the newest ``keep``; the run still resumes."""

import os

import pytest
import torch

from dist_helpers import run_distributed


def _iters(save_dir):
    return sorted(n for n in os.listdir(save_dir) if n.startswith("iter_"))


def _worker(rank, world, hf_dir, save_dir):
    from trainer_fixtures import batch_of, make_engine

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training import checkpoint
    from zeda_megatron.training.step import train_step

    init_parallel()
    engine = make_engine(hf_dir, stage="sft", kl_weight=0.0, lr=1e-3)
    init = {k: v.detach().clone() for k, v in engine.student.state_dict().items() if torch.is_tensor(v)}
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(1, 5):  # 4 saves, keep 2
        train_step(engine, [batch_of([torch.randint(0, 128, (12,), generator=gen).tolist()])])
        path = checkpoint.save(engine, step, save_dir, keep=2)
        seen.append((os.path.basename(path), _iters(save_dir)))
    saved = {k: v.detach().clone() for k, v in engine.student.state_dict().items() if torch.is_tensor(v)}
    opt_step = engine.scheduler.num_steps
    # resume: a fresh engine loads what `latest` names and holds the saved weights and schedule
    fresh = make_engine(hf_dir, stage="sft", kl_weight=0.0, lr=1e-3, seed=1)
    meta = checkpoint.load(fresh, checkpoint.latest(save_dir))
    loaded = {k: v for k, v in fresh.student.state_dict().items() if torch.is_tensor(v)}
    same = all(torch.equal(saved[k], loaded[k]) for k in saved)
    changed = any(not torch.equal(saved[k], init[k]) for k in saved)  # the steps moved the weights
    return {"seen": seen, "step": meta["step"], "same": same, "changed": changed,
            "sched": (opt_step, fresh.scheduler.num_steps)}


def test_keep_two_of_four_saves_and_resume(tmp_path):
    from bridge_fixtures import make_tiny_hf

    from zeda_megatron.training import checkpoint

    hf = make_tiny_hf("qwen3_moe", str(tmp_path / "hf"), seed=0)
    save_dir = str(tmp_path / "ckpt")
    r = run_distributed(_worker, 1, hf, save_dir)[0]
    assert r["seen"] == [
        ("iter_0000001", ["iter_0000001"]),
        ("iter_0000002", ["iter_0000001", "iter_0000002"]),
        ("iter_0000003", ["iter_0000002", "iter_0000003"]),
        ("iter_0000004", ["iter_0000003", "iter_0000004"]),
    ]
    assert checkpoint.latest(save_dir) == os.path.join(save_dir, "iter_0000004")
    assert r["step"] == 4 and r["same"] and r["changed"]
    assert r["sched"][0] == r["sched"][1] > 0


def _fake(save_dir, *steps):
    for s in steps:
        os.makedirs(os.path.join(save_dir, f"iter_{s:07d}"))
        open(os.path.join(save_dir, f"iter_{s:07d}", "x"), "w").close()


def _point_latest(save_dir, step):
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(f"iter_{step:07d}")


def test_prune_spares_latest_current_and_later_steps(tmp_path):
    from zeda_megatron.training.checkpoint import prune

    d = str(tmp_path)
    _fake(d, 5, 10, 15, 20, 30)
    os.makedirs(os.path.join(d, "iter_notastep"))
    _point_latest(d, 20)
    assert prune(d, 0) == [] and len(_iters(d)) == 6  # 0: keep everything
    # current = latest = 20: keep 2 -> 15 and 20; 30 (a later step of an earlier history) untouched
    assert sorted(os.path.basename(p) for p in prune(d, 2)) == ["iter_0000005", "iter_0000010"]
    assert _iters(d) == ["iter_0000015", "iter_0000020", "iter_0000030", "iter_notastep"]
    # keep 1: only the current one of the older steps remains
    prune(d, 1, current=os.path.join(d, "iter_0000020"))
    assert _iters(d) == ["iter_0000020", "iter_0000030", "iter_notastep"]
    # the folder `latest` names is never deleted, even when it is not the current one
    _fake(d, 40, 50)
    _point_latest(d, 20)
    prune(d, 1, current=os.path.join(d, "iter_0000050"))
    assert _iters(d) == ["iter_0000020", "iter_0000050", "iter_notastep"]


@pytest.mark.parametrize("value,match", [("-1", r"trainer\.keep_checkpoints=-1 must be >= 0"),
                                         ("two", r"trainer\.keep_checkpoints='two' must be an integer"),
                                         ("1.5", r"trainer\.keep_checkpoints=1\.5 must be an integer")])
def test_keep_checkpoints_is_validated(value, match):
    from test_training_infra import compose

    from zeda_megatron.training.validate import ConfigError, validate_config

    assert compose().trainer.keep_checkpoints == 2  # the default
    validate_config(compose("trainer.keep_checkpoints=0"), 1)
    with pytest.raises(ConfigError, match=match):
        validate_config(compose(f"trainer.keep_checkpoints={value}"), 1)
