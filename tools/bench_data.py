#!/usr/bin/env python
"""Stage-1 data throughput: packed (thd, document-aware) vs padded batches on variable-length samples.

    python tools/bench_data.py [--samples 2000] [--seq-length 512] [--steps 6] [--micro-batch-size 4]
                               [--model tiny_qwen3] [--reduced]

Writes ``--samples`` prompt/response samples with log-normal lengths (median ``seq_length/6``, clipped
to [8, seq_length]), prepares them with ``zeda_megatron.training.prepared.prepare`` (megatron-core
.bin/.idx), then

* pad fraction: share of padding positions over one whole epoch of micro-batches, per mode;
* training tokens/s: forward + backward + Adam step of a randomly initialised tiny model (``conf/model``,
  megatron-core GPTModel, the CPU SDPA attention; thd for the packed batches) over ``--steps`` steps of
  ``--micro-batch-size`` rows; tokens = real (non-pad) tokens processed, per second of this process's
  CPU time (robust on a shared machine; set OMP_NUM_THREADS=1 for a single-core figure).

Ends with one JSON line: ``packed_tokens_per_s``, ``padded_tokens_per_s``, ``pad_fraction_packed``,
``pad_fraction_padded`` (+ ``speedup``, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--model", default="tiny_qwen3", help="a conf/model preset with an hf_config (random init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduced", action="store_true", help="CI size: 300 samples, seq 128, 2 steps")
    args = p.parse_args(argv)
    if args.reduced:
        args.samples, args.seq_length, args.steps = 300, 128, 2
    return args


def write_samples(path: str, n: int, seq_length: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq_length / 6), 0.7, n), 8, seq_length).astype(int)
    with open(path, "w") as f:
        for n_ids in lengths:
            p = int(rng.integers(2, max(3, n_ids // 3)))
            r = max(1, int(n_ids) - p - 2)  # + BOS + EOS
            f.write(json.dumps({"prompt": "".join(rng.choice(list("abcdefgh "), p)),
                                "response": "".join(rng.choice(list("ABCDEFGH "), r))}) + "\n")


def epoch_pad_fraction(ds, mbs: int, packing: bool, seed: int) -> float:
    from zeda_megatron.training.batching import PackedRows, iterate_batches, pad_fraction

    if packing:
        steps = -(-len(PackedRows(ds, seed).plan(0)) // mbs)
    else:
        steps = -(-len(ds) // mbs)
    return pad_fraction(mb for step in iterate_batches(ds, mbs, 1, 0, 1, seed, max_steps=steps, packing=packing)
                        for mb in step)


def train_tokens_per_s(model, ds, mbs: int, steps: int, packing: bool, seed: int) -> tuple[float, int]:
    import torch

    from zeda_megatron.training.batching import iterate_batches

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [step[0] for step in iterate_batches(ds, mbs, 1, 0, 1, seed, max_steps=steps + 1, packing=packing)]

    def step(b):
        loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"].clamp_min(0),
                     packed_seq_params=b.get("packed_seq_params"), padding_mask=b["padding_mask"])
        loss = (loss.float() * b["loss_mask"]).sum() / b["loss_mask"].sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up (allocations, lazy init)
    tokens = 0
    clock = time.perf_counter if torch.cuda.is_available() else time.process_time
    t0 = clock()
    for b in batches[1:]:
        step(b)
        tokens += int((~b["padding_mask"]).sum())
    return tokens / (clock() - t0), tokens


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    args = parse(argv)
    import torch
    from omegaconf import OmegaConf

    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.training.datasets import PreparedDataset
    from zeda_megatron.training.prepared import prepare
    from zeda_megatron.training.tokenizers import ByteTokenizer

    hf = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{args.model}.yaml"))["hf_config"])
    hf["max_position_embeddings"] = max(int(hf.get("max_position_embeddings", 0)), args.seq_length)
    tok = ByteTokenizer(int(hf["vocab_size"]))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "bench.jsonl")
        write_samples(src, args.samples, args.seq_length, args.seed)
        prepare(src, tok, os.path.join(tmp, "bench"))
        ds = PreparedDataset(os.path.join(tmp, "bench"), tok, args.seq_length)
        pad_packed = epoch_pad_fraction(ds, args.micro_batch_size, True, args.seed)
        pad_padded = epoch_pad_fraction(ds, args.micro_batch_size, False, args.seed)
        print(f"[bench_data] {len(ds)} samples, mean {float(ds.positions().mean()):.0f} positions, "
              f"seq_length {args.seq_length}: pad fraction packed {pad_packed:.3f}, padded {pad_padded:.3f}",
              flush=True)
        init_parallel(tp=1, pp=1, ep=1, seed=args.seed)
        rates = {}
        for packing in (True, False):
            torch.manual_seed(args.seed)
            model, _, _ = build_model(hf)
            model.train()
            rates[packing], tokens = train_tokens_per_s(model, ds, args.micro_batch_size, args.steps, packing,
                                                        args.seed)
            print(f"[bench_data] {'packed' if packing else 'padded'}: {tokens} real tokens in {args.steps} steps, "
                  f"{rates[packing]:.0f} tokens/s", flush=True)
        destroy_parallel()
    print(json.dumps({
        "packed_tokens_per_s": round(rates[True], 1), "padded_tokens_per_s": round(rates[False], 1),
        "pad_fraction_packed": round(pad_packed, 5), "pad_fraction_padded": round(pad_padded, 5),
        "speedup": round(rates[True] / rates[False], 3), "samples": args.samples, "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size, "steps": args.steps, "model": args.model,
        "torch_threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
