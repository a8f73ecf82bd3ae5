"""Stage-1 packing: plans, exact resume, data-parallel split, and each packed sample's loss equal to its
loss alone through a tiny megatron model of both families (thd on the CPU SDPA path)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from zeda_megatron.training import batching as B
from zeda_megatron.training.datasets import JsonlDataset
from zeda_megatron.training.tokenizers import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs(tmp_path, n=40, seed=0, max_len=30):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p, r = int(rng.integers(1, max_len)), int(rng.integers(1, max_len))
        rows.append({"prompt": "".join(chr(97 + int(c)) for c in rng.integers(0, 26, p)),
                     "response": "".join(chr(65 + int(c)) for c in rng.integers(0, 26, r))})
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_best_fit_decreasing_fills_bins():
    sizes = np.array([7, 3, 5, 1, 9, 2, 4, 6, 8, 10, 3, 3])
    bins = B.best_fit_decreasing(sizes, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sizes[b].sum() <= 10 for b in bins)
    assert len(bins) == int(np.ceil(sizes.sum() / 10))  # optimal here: 61 -> 7 bins


def test_packed_batches_layout_resume_and_dp(tmp_path):
    tok = ByteTokenizer(512)
    ds = JsonlDataset(_docs(tmp_path, n=60), tok, seq_length=64)
    it = B.iterate_batches(ds, 2, 2, 0, 1, seed=3, packing=True)
    steps = [next(it) for _ in range(6)]
    for step in steps:
        for mb in step:
            assert mb["tokens"].shape == (1, 128) and mb["padding_mask"].shape == (1, 128)
            cu = mb["cu_seqlens"].tolist()
            assert cu[0] == 0 and cu[-1] == 128 and 64 in cu  # bins never straddle
            p = mb["packed_seq_params"]
            assert p.qkv_format == "thd" and p.max_seqlen_q == max(b - a for a, b in zip(cu[:-1], cu[1:]))
            for a, b in zip(cu[:-1], cu[1:]):  # positions restart per segment
                assert mb["position_ids"][0, a:b].tolist() == list(range(b - a))
            # labels only where trained, and only on real tokens
            assert not (mb["loss_mask"].bool() & mb["padding_mask"]).any()
            assert ((mb["labels"] != -100) == mb["loss_mask"].bool()).all()
    # each document exactly once per epoch: the first epoch's bins cover the dataset
    rows = B.PackedRows(ds, seed=3)
    first = rows.plan(0)
    assert sorted(first.docs.tolist()) == list(range(len(ds)))
    assert all(ds.positions()[first.bin(k)].sum() <= 64 for k in range(len(first)))
    # resume: step k on == the uninterrupted run from step k on
    for k in (1, 4):
        again = list(B.iterate_batches(ds, 2, 2, 0, 1, seed=3, start_step=k, max_steps=6, packing=True))
        for a, b in zip(again, steps[k:]):
            assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    # two DP ranks split the same global batch
    dp = [next(B.iterate_batches(ds, 2, 1, r, 2, seed=3, packing=True)) for r in range(2)]
    one = torch.cat([mb["tokens"] for mb in steps[0]], dim=1)
    assert torch.equal(torch.cat([dp[0][0]["tokens"], dp[1][0]["tokens"]], dim=1), one)


def _tiny_model(name):
    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.distributed import init_parallel

    hf = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{name}.yaml"))["hf_config"])
    init_parallel(tp=1, pp=1, ep=1, seed=0)
    torch.manual_seed(0)
    model, _, _ = build_model(hf)
    return model.eval()


def _token_losses(model, batch):
    labels = batch["labels"].clamp_min(0)
    with torch.no_grad():
        loss = model(batch["tokens"], batch["position_ids"], None, labels=labels,
                     packed_seq_params=batch.get("packed_seq_params"), padding_mask=batch["padding_mask"])
    return loss.float() * batch["loss_mask"]


@pytest.mark.parametrize("name", ["tiny_qwen3", "tiny_glm"])
def test_packed_loss_equals_each_sample_alone(tmp_path, name):
    tok = ByteTokenizer(512)
    ds = JsonlDataset(_docs(tmp_path, n=12, seed=1, max_len=12), tok, seq_length=64)
    model = _tiny_model(name)
    rows = B.PackedRows(ds, seed=0).plan(0)
    bins = [rows.bin(k) for k in range(min(2, len(rows)))]
    assert sum(len(b) for b in bins) >= 4  # several documents share a sequence
    packed = B.pack_documents(ds, bins)
    per_tok = _token_losses(model, packed)[0]
    cu = packed["cu_seqlens"].tolist()
    docs = [int(d) for b in bins for d in b]
    for j, d in enumerate(docs):  # segment j is document d (pads come after a bin's documents)
        alone = ds[d]
        single = {k: v[None] for k, v in alone.items()}
        ref = _token_losses(model, single)[0]
        mine = per_tok[cu[_seg(cu, packed, j)]: cu[_seg(cu, packed, j) + 1]]
        assert mine.numel() <= ref.numel() and ref[mine.numel():].sum() == 0
        assert float(alone["loss_mask"].sum()) > 0
        torch.testing.assert_close(mine, ref[: mine.numel()], rtol=1e-5, atol=1e-5)


def _seg(cu, packed, j):
    """Index of the j-th document segment (skipping the bins' padding segments)."""
    pad = packed["padding_mask"][0]
    k = -1
    for s in range(len(cu) - 1):
        if not pad[cu[s]]:
            k += 1
            if k == j:
                return s
    raise IndexError(j)
