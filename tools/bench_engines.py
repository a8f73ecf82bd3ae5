#!/usr/bin/env python
"""engine=megatron vs engine=deepspeed (ZeRO 1/2/3, optimizer offload) on the tiny model, CPU/gloo.

    python tools/bench_engines.py [--model tiny_qwen3] [--world 2] [--steps 6] [--ep 1]

Spawns ``--world`` gloo processes; each builds the co-located pair per engine on the same random
tiny checkpoint and runs ``--steps`` stage-1 steps (the trainer's train_step) on the same batches.
Reports per engine: the median step time (after one warm-up step), the last loss, and this rank's
optimizer-state bytes measured from the tensors (Adam moments, plus ZeRO's fp32 master partitions),
by device, and the Adam moments alone. Ends with one JSON line (rank 0)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ENGINES = {
    "megatron": None,
    "deepspeed_zero1": {"zero_stage": 1},
    "deepspeed_zero2": {"zero_stage": 2},
    "deepspeed_zero3": {"zero_stage": 3},
    "deepspeed_zero2_offload": {"zero_stage": 2, "offload_optimizer": True},
}


def _batches(step, rank, vocab, rows=2, length=32):
    import torch

    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, vocab, (rows, length + 1), generator=gen)
    mb = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
          "loss_mask": torch.ones(rows, length), "position_ids": torch.arange(length).expand(rows, length).contiguous(),
          "padding_mask": torch.zeros(rows, length, dtype=torch.bool)}
    return [{k: v[i:i + 1] for k, v in mb.items()} for i in range(rows)]


def _worker(rank, world, port, hf_dir, vocab, steps, ep, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.spec import compose, resolve
    from zeda_megatron.training.ds_engine import optimizer_state_bytes
    from zeda_megatron.training.engine import build_engine
    from zeda_megatron.training.step import train_step

    optim = {"lr": 1e-3, "schedule": "cosine", "warmup_fraction": 0.1, "clip_grad": 1.0, "weight_decay": 0.1,
             "min_lr": 0.0, "adam_beta2": 0.999}
    results = {}
    for name, cfg in ENGINES.items():
        if cfg and cfg["zero_stage"] == 3 and ep > 1:
            continue  # refused layout (ZeRO-3 with EP)
        init_parallel(ep=ep, seed=0)
        overrides = [f"model.hf_dir={hf_dir}", "model.hf_config=null", "stage=sft", "stage.kl_weight=0.5",
                     "model.null_experts.ratio=null", "model.null_experts.num=4", "model.null_experts.weight=2.0",
                     f"trainer.max_steps={steps}", "seed=0", f"parallel.ep={ep}", "trainer.micro_batch_size=1",
                     f"trainer.global_batch_size={world}", *(f"optim.{k}={v}" for k, v in optim.items())]
        if cfg is not None:
            overrides += ["engine=deepspeed", *(f"engine.{k}={v}" for k, v in cfg.items())]
        engine = build_engine(resolve(compose(overrides, run_dir=out), world, inputs=False))
        times, loss = [], None
        for step in range(steps):
            t0 = time.perf_counter()
            loss = train_step(engine, _batches(step, rank, vocab))["loss"]
            times.append(time.perf_counter() - t0)
        opt = engine.ds.optimizer if cfg is not None else engine.optimizer
        results[name] = {"step_time_s": statistics.median(times[1:] or times), "last_loss": loss,
                         "optimizer_state_bytes": optimizer_state_bytes(opt),
                         "adam_moment_bytes": sum(optimizer_state_bytes(opt, masters=False).values())}
        if cfg is not None:
            results[name]["deepspeed_cpu_offload"] = bool(getattr(engine.ds.optimizer, "cpu_offload", False))
        del engine  # the next engine's model-parallel groups are rebuilt in the same process group
    destroy_parallel()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny_qwen3")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ep", type=int, default=1)
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    from zeda_megatron.distributed import free_port
    from omegaconf import OmegaConf

    from zeda_megatron.spec import compose
    from zeda_megatron.training.random_init import write_random_hf

    hf = OmegaConf.to_container(compose([f"model={args.model}"], run_dir=".").model.hf_config, resolve=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        write_random_hf(hf, hf_dir, seed=0)
        mp.start_processes(_worker, args=(args.world, free_port(), hf_dir, int(hf["vocab_size"]), args.steps, args.ep, tmp),
                           nprocs=args.world, join=True, start_method="spawn")
        ranks = []
        for r in range(args.world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    r0 = ranks[0]
    base = sum(r0["megatron"]["optimizer_state_bytes"].values())
    print(f"{'engine':<26} {'step s':>8} {'last loss':>10} {'opt bytes/rank':>15} {'vs megatron':>12}  devices")
    for name, r in r0.items():
        b = sum(r["optimizer_state_bytes"].values())
        print(f"{name:<26} {r['step_time_s']:8.3f} {r['last_loss']:10.5f} {b:15d} {b / base:12.3f}  "
              f"{','.join(sorted(r['optimizer_state_bytes']))}{' (DeepSpeed: offloaded)' if r.get('deepspeed_cpu_offload') else ''}")
    summary = {"model": args.model, "world": args.world, "ep": args.ep, "steps": args.steps,
               "engines": {n: {"step_time_s": round(r["step_time_s"], 4), "last_loss": r["last_loss"],
                               "optimizer_state_bytes_per_rank": [sum(rr[n]["optimizer_state_bytes"].values()) for rr in ranks],
                               "adam_moment_bytes_per_rank": [rr[n]["adam_moment_bytes"] for rr in ranks],
                               "optimizer_state_devices": sorted(r["optimizer_state_bytes"]),
                               **({"deepspeed_cpu_offload": r["deepspeed_cpu_offload"]} if "deepspeed_cpu_offload" in r else {})}
                           for n, r in r0.items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
