"""On-policy sampling (training/rollout.py, the trainer's stage-2 sampler) under expert parallelism:
a rank whose responses all end early keeps stepping with the others (the all-to-alls pair up: both
ranks run the same number of forwards), and its rows end at their EOS (right padding: nothing after
it is trained or routed)."""

from dist_helpers import run_distributed


def _worker(rank, world, hf_dir):
    from trainer_fixtures import make_engine

    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training.rollout import sample

    init_parallel(ep=2)
    engine = make_engine(hf_dir, stage="opd", nll_weight=0.0, kl_weight=1.0, lr=1e-4, bias_update=True)
    prompts = [[[5 + rank, 9, 11 + rank]]]  # one prompt per rank, different on each
    greedy = dict(max_new_tokens=6, temperature=0.0, pad_id=0)
    probe = sample(engine.student, prompts, eos_id=-1, **greedy)
    first = int(probe.batches[0]["labels"][0, 2])  # this rank's first (greedy) sampled token
    # rank 0 stops at its first token; rank 1 never emits EOS: both must still return
    eos = first if rank == 0 else -1
    out = sample(engine.student, prompts, eos_id=eos, **greedy)
    return {k: out.batches[0][k] for k in ("tokens", "labels", "loss_mask", "padding_mask")} | {
        "first": first, "probe_labels": probe.batches[0]["labels"], "forwards": out.forwards,
        "responses": out.responses[0], "replay": out.replay[0]}


def test_sampling_stops_together_and_masks_finished_rows(tmp_path):
    from bridge_fixtures import make_tiny_hf

    hf = make_tiny_hf("qwen3_moe", str(tmp_path / "hf"), seed=0)
    r0, r1 = run_distributed(_worker, 2, hf)
    # both ranks ran the same forwards: the prefill + 5 decode steps rank 1 needed for its 6 tokens
    assert r0["forwards"] == r1["forwards"] == 6
    # rank 1 ran all 6 passes: prompt (3) + 6 sampled tokens -> 8 inputs, loss on the 6 sampled ones
    assert r1["labels"].shape == (1, 8) and len(r1["responses"][0]) == 6
    assert r1["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert not r1["padding_mask"].any()
    assert r1["labels"].equal(r1["probe_labels"])  # greedy: the same tokens again
    # rank 0 stopped at its EOS (trained on, mask 1); it kept stepping with rank 1 but grew no further
    assert r0["labels"].shape == (1, 3) and r0["responses"][0] == [r0["first"]]
    assert r0["labels"][0, 2] == r0["first"] and r0["loss_mask"][0].tolist() == [0, 0, 1]
    assert not r0["padding_mask"].any()
    # the routing to replay covers each rank's own training length (the dummy steps recorded nothing)
    assert all(t.shape[0] == 3 for t in r0["replay"]) and all(t.shape[0] == 8 for t in r1["replay"])
