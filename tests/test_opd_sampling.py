"""On-policy sampling under expert parallelism: a rank whose responses all end early keeps stepping
with the others (the all-to-alls pair up), and its finished rows are padded and masked."""

import torch

from dist_helpers import run_distributed


def _worker(rank, world, hf_dir):
    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.mcore.config import NullExpertSettings
    from zeda_megatron.training.engine import LossSpec, build_engine
    from zeda_megatron.training.opd import sample

    init_parallel(ep=2)
    engine = build_engine(hf_dir=hf_dir, null=NullExpertSettings(4, 2.0), group_loss_coeff=0.1,
                          loss_spec=LossSpec("opd", 0.0, 1.0), optim={"lr": 1e-4, "schedule": "constant"},
                          max_steps=1, seed=0)
    prompts = [[[5 + rank, 9, 11 + rank]]]  # one prompt per rank, different on each
    greedy = dict(max_new_tokens=6, temperature=1e-6, pad_id=0)
    probe = sample(engine, prompts, eos_id=-1, generator=torch.Generator().manual_seed(0), **greedy)
    first = int(probe[0]["labels"][0, -6])  # this rank's first (greedy) sampled token
    # rank 0 stops at its first token; rank 1 never emits EOS: both must still return
    eos = first if rank == 0 else -1
    out = sample(engine, prompts, eos_id=eos, generator=torch.Generator().manual_seed(0), **greedy)
    return {"tokens": out[0]["tokens"], "labels": out[0]["labels"], "mask": out[0]["loss_mask"], "first": first}


def test_sampling_stops_together_and_masks_finished_rows(tmp_path):
    from zeda_megatron.bridge.testing import make_tiny_hf

    hf = make_tiny_hf("qwen3_moe", str(tmp_path / "hf"), seed=0)
    r0, r1 = run_distributed(_worker, 2, hf)
    assert r0["labels"].shape == r1["labels"].shape  # same number of sampling passes
    # rank 0: the EOS is trained on (mask 1), everything after it is pad and masked out
    assert r0["mask"][0, -6] == 1 and r0["labels"][0, -6] == r0["first"]
    assert (r0["mask"][0, -5:] == 0).all() and (r0["labels"][0, -5:] == 0).all()
    assert (r1["mask"][0, -6:] == 1).all()
