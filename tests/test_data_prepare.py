"""prepare_data: megatron-core indexed datasets with loss masks, errors, atomic/up-to-date output, the
Hydra command, lazy reading (a rank's memory flat in the dataset size) and training from a prefix."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from zeda_megatron.training import data as D
from zeda_megatron.training.prepared import PreparedData, is_prepared, paths, prepare, read_meta
from zeda_megatron.training.tokenizers import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def short_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": f"q{i} " + "x" * rng.randint(1, 12), "response": "a" * rng.randint(1, 12)} for i in range(n)]


def test_prepare_matches_in_memory_tokenisation(tmp_path):
    tok = ByteTokenizer(512)
    rows = [{"prompt": "ab", "response": "xyz"}, {"prompt": "p" * 20, "response": "y"}, {"prompt": "", "response": "zz"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    meta = prepare(path, tok, str(tmp_path / "out"), chat_template=False)
    assert not meta["skipped"] and meta["num_documents"] == 3 and meta["format"] == "prompt_response"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raw = IndexedDataset(str(tmp_path / "out"))  # plain megatron-core reader
    assert raw[0].tolist() == [tok.bos_id, 97, 98, 120, 121, 122, tok.eos_id] and raw.index.dtype == np.uint16
    data = PreparedData(str(tmp_path / "out"), tok, chat_template=False)
    assert data.mask(0).tolist() == [0, 0, 0, 1, 1, 1, 1] and data.first.tolist() == [3, 21, 1]
    # the same samples as the in-memory dataset, which tokenises through the same template function
    for seq in (8, 12, 40):
        lazy = D.PreparedDataset(str(tmp_path / "out"), tok, seq)
        mem = D.JsonlDataset(path, tok, seq)
        assert len(lazy) == len(mem) and lazy.dropped == mem.dropped
        for i in range(len(mem)):
            for k, v in mem[i].items():
                assert torch.equal(lazy[i][k], v), (seq, i, k)
    assert D.PreparedDataset(str(tmp_path / "out"), tok, 8).dropped == 1  # prompt of 21 ids > S+1
    # stage-2 prompts from the same prefix: the prompt part, cut keeping its end
    prompts = D.PreparedPromptDataset(str(tmp_path / "out"), tok, seq_length=16, max_new_tokens=6)
    assert prompts[0]["tokens"][:3].tolist() == [tok.bos_id, 97, 98] and int(prompts[0]["prompt_length"]) == 3
    assert int(prompts[1]["prompt_length"]) == 10


def test_prepare_up_to_date_atomic_and_mismatch(tmp_path):
    tok = ByteTokenizer(512)
    path = write_jsonl(tmp_path / "d.jsonl", short_rows(10))
    prefix = str(tmp_path / "p")
    assert not prepare(path, tok, prefix)["skipped"]
    stamp = os.stat(paths(prefix)["bin"]).st_mtime_ns
    assert prepare(path, tok, prefix)["skipped"] and os.stat(paths(prefix)["bin"]).st_mtime_ns == stamp
    write_jsonl(path, short_rows(12))  # the source changed: prepared again
    assert prepare(path, tok, prefix)["num_documents"] == 12
    # a bad line: clear error, the previous output untouched, no temporary files left
    write_jsonl(path, short_rows(3) + [{"prompt": "a"}])
    with pytest.raises(ValueError, match=r"d\.jsonl: line 4 has no 'response' key"):
        prepare(path, tok, prefix)
    assert read_meta(prefix)["num_documents"] == 12 and is_prepared(prefix)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    # read with another tokenizer or template: refused
    with pytest.raises(ValueError, match="another tokenizer"):
        PreparedData(prefix, ByteTokenizer(600))
    with pytest.raises(ValueError, match="chat_template"):
        PreparedData(prefix, tok, chat_template=True)
    with pytest.raises(ValueError, match="prompts only"):
        write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}])
        prepare(str(tmp_path / "q.jsonl"), tok, str(tmp_path / "q"), need="prompt")
        D.PreparedDataset(str(tmp_path / "q"), tok, 16)


def test_prepare_command_and_training_reads_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", short_rows(20))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "zeda_megatron.prepare_data", "model=tiny_qwen3", f"data.path={path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["num_documents"] == 20 and not res["skipped"] and is_prepared(res["prefix"])
    # training pointed at the JSONL finds the prepared copy (same config -> same prefix, nothing rewritten)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        cfg = compose("config", overrides=["run_dir=.", "model=tiny_qwen3", f"data.path={path}"])
    from zeda_megatron.spec import resolve

    spec = resolve(cfg)
    tok = D.load_tokenizer(spec.model)
    stamp = os.stat(res["prefix"] + ".bin").st_mtime_ns
    ds = D.build_dataset(spec, tok)
    assert isinstance(ds, D.PreparedDataset) and ds.path == res["prefix"] and len(ds) == 20
    assert os.stat(res["prefix"] + ".bin").st_mtime_ns == stamp
    assert D.check_data_file(res["prefix"]) == "prompt_response"
    # a bad file: exit code 2 and the file + line + key
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"txt": "b"}])
    out = subprocess.run(cmd[:-1] + [f"data.path={bad}"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 2 and "bad.jsonl: line 2 has no 'text' key" in out.stderr


RSS_PROBE = r"""
import gc, json, sys
from zeda_megatron.training import data as D


def rss_kb():
    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0])


tok = D.ByteTokenizer(512)
out = {}
for packing in (False, True):  # the training data path: a prepared prefix read lazily, 30 steps each
    ds = D.PreparedDataset(sys.argv[1], tok, seq_length=128)
    it = D.iterate_batches(ds, 4, 2, 0, 1, seed=0, packing=packing)
    trained = sum(int(mb["loss_mask"].sum()) for _ in range(30) for mb in next(it))
    del it, ds
    gc.collect()
    out["packed" if packing else "padded"] = {"rss_kb": rss_kb(), "trained": trained}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory):
    root = tmp_path_factory.mktemp("rss")
    tok = ByteTokenizer(512)
    out = {}
    for n in (20_000, 200_000):
        path = write_jsonl(root / f"d{n}.jsonl", short_rows(n))
        out[n] = str(root / f"p{n}")
        prepare(path, tok, out[n])
        os.remove(path)
    return out


def test_rank_memory_flat_in_dataset_size(small_and_large):
    """A rank reading 20k vs 200k prepared samples (30 steps padded, then 30 packed) has the same resident
    memory (within 5%)."""
    rss = {}
    for n, prefix in small_and_large.items():
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, prefix], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert out.returncode == 0, out.stderr
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("padded", "packed"):
        small, large = rss[20_000][mode]["rss_kb"], rss[200_000][mode]["rss_kb"]
        assert rss[20_000][mode]["trained"] > 0 and rss[200_000][mode]["trained"] > 0
        print(f"{mode}: RSS 20k samples {small / 1024:.1f} MiB, 200k samples {large / 1024:.1f} MiB")
        assert abs(large - small) / small < 0.05, (mode, rss)
