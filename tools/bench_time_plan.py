#!/usr/bin/env python
"""Calibration of the time plan (zeda_megatron.plan.time) on this CPU: predicted vs measured seconds.

    python tools/bench_time_plan.py                       # hidden 256, 4 layers, both families (~1-2 min)
    python tools/bench_time_plan.py --hidden 128 --seq 128 --decode-steps 12      # CI size

First the CPU's own spec is measured in the same run (so that the comparison does not depend on the
machine): fp32 matmul FLOP/s (1 thread, the model's GEMM sizes), memory bandwidth (a 64 MB copy),
and host seconds per aten operation through megatron-core (a tiny dense GPTModel forward, its
operations counted). Then, for randomly initialised GLM- (MLA) and Qwen3-shaped (GQA) null-expert
models: a stage-1 training step (fp32, full recompute, one micro-batch) and a decode step of the
stage-2 sampler (``--decode-batch`` sequences; each step timed), each measured (the least disturbed of
``--reps`` runs: the machine may be shared) and predicted by the plan's own
``train_step_seconds`` / ``decode_step_seconds`` with that CPU spec. Prints a table, then one JSON line
with ``ratios`` (predicted / measured) and ``max_ratio`` (the worse of ratio and 1/ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256, help="stage-1 tokens per sequence")
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--families", default="glm,qwen")
    return p.parse_args(argv)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class _Count:
    """Counts aten operations (a TorchDispatchMode, built lazily: torch is imported in main)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.n += 1
                return func(*args, **(kwargs or {}))

        return Count()


class CpuProbe:
    """This CPU's fp32 matmul FLOP/s, memory bandwidth and host seconds per megatron-core aten op; each
    :meth:`measure` is one short sample (the calibration interleaves them with the model's runs)."""

    def __init__(self, a):
        import torch
        from megatron.core.models.gpt import GPTModel
        from megatron.core.transformer import TransformerConfig

        from zeda_megatron.mcore.specs import gpt_block_spec
        from zeda_megatron.platform import cpu_config_overrides

        self.x, self.w = torch.randn(a.mbs * a.seq, a.hidden), torch.randn(a.hidden, 4 * a.hidden)
        self.src = torch.randn(16 * 1024 * 1024)
        self.dst = torch.empty_like(self.src)
        # a tiny stock GPT with megatron-core's MoE layers (4 experts top-2, alltoall dispatcher): its per-op
        # host cost includes the Python of megatron's modules and dispatcher, independent of the widths
        cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                                normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                                num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                                moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0,
                                params_dtype=torch.float32, **cpu_config_overrides())
        self.model = GPTModel(cfg, gpt_block_spec(cfg), vocab_size=32, max_sequence_length=64,
                              position_embedding_type="rope")
        self.ids, self.pos = torch.zeros(1, 4, dtype=torch.long), torch.arange(4).view(1, 4)
        with torch.no_grad():
            self.forward()
            count = _Count()
            with count:
                self.forward()
        self.forward_ops = count.n
        self.train()
        count = _Count()
        with count:
            self.train()
        self.train_ops = count.n

    def forward(self):
        import torch

        with torch.no_grad():
            self.model(self.ids, self.pos, None)

    def train(self):  # forward + backward, as a training step runs them
        self.model(self.ids, self.pos, None, labels=self.ids).sum().backward()

    def measure(self) -> dict:
        n = self.x.shape[0] * self.w.shape[0] * self.w.shape[1] * 2 * 10
        return {"matmul_flops": n / _best(lambda: [self.x @ self.w for _ in range(10)], 2),
                "memory_bytes_s": 2 * self.src.numel() * 4 * 4 / _best(lambda: [self.dst.copy_(self.src)
                                                                            for _ in range(4)], 2),
                "host_op_s": _best(lambda: [self.forward() for _ in range(20)], 2) / 20 / self.forward_ops,
                "host_train_op_s": _best(lambda: [self.train() for _ in range(10)], 2) / 10 / self.train_ops}


def _hf_overrides(a, family: str) -> list[str]:
    h = a.hidden
    common = [f"model.hf_config.vocab_size={a.vocab}", f"model.hf_config.hidden_size={h}",
              f"model.hf_config.num_hidden_layers={a.layers}", f"model.hf_config.num_experts_per_tok={a.topk}",
              f"model.hf_config.moe_intermediate_size={h // 2}", f"model.hf_config.intermediate_size={2 * h}",
              f"model.hf_config.max_position_embeddings={max(a.seq, a.prompt + 2 * a.decode_steps) + 8}",
              f"model.hf_config.num_attention_heads={max(2, h // 64)}"]
    if family == "glm":
        return ["model=tiny_glm", *common, f"model.hf_config.n_routed_experts={a.experts}",
                f"model.hf_config.num_key_value_heads={max(2, h // 64)}", f"model.hf_config.kv_lora_rank={h // 4}",
                f"model.hf_config.q_lora_rank={3 * h // 8}", f"model.hf_config.v_head_dim={h // max(2, h // 64)}",
                "model.hf_config.mlp_layer_types=[" + ",".join(["dense"] + ["sparse"] * (a.layers - 1)) + "]"]
    heads = max(2, h // 64)
    return ["model=tiny_qwen3", *common, f"model.hf_config.num_experts={a.experts}",
            f"model.hf_config.num_key_value_heads={heads // 2 if heads % 2 == 0 else heads}",
            "model.hf_config.mlp_only_layers=[0]", f"model.hf_config.head_dim={h // heads}"]


def calibrate(a, family: str, probe: CpuProbe) -> dict:
    """The family's training and decode steps, each run interleaved with a sample of the CPU spec (a
    shared machine's load changes from second to second): the least disturbed of ``--reps`` samples of
    each, then the prediction from that spec."""
    import torch

    from zeda_megatron.plan.devices import DeviceSpec
    from zeda_megatron.plan.shapes import shapes_of
    from zeda_megatron.plan.time import decode_step_seconds, train_step_seconds
    from zeda_megatron.spec import compose, resolve
    from zeda_megatron.training.engine import build_engine
    from zeda_megatron.training.random_init import write_random_hf
    from zeda_megatron.training.rollout import sample
    from zeda_megatron.training.step import train_step

    over = [*_hf_overrides(a, family), "stage=sft", "stage.kl_weight=0.0", "trainer.recompute=full",
            "trainer.precision=fp32", f"trainer.seq_length={a.seq}", f"trainer.micro_batch_size={a.mbs}",
            f"trainer.global_batch_size={a.mbs}", "parallel.gpu_memory_gb=null"]
    spec = resolve(compose(over, run_dir=tempfile.mkdtemp()), 1, inputs=False, on_gpu=False)
    hf = tempfile.mkdtemp()
    write_random_hf(spec.model.hf_config, hf, seed=0)
    engine = build_engine(spec, hf)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, a.vocab, (a.mbs, a.seq), generator=g)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(a.mbs, a.seq),
             "position_ids": torch.arange(a.seq).expand(a.mbs, a.seq).contiguous(),
             "padding_mask": torch.zeros(a.mbs, a.seq, dtype=torch.bool)}
    prompts = [[torch.randint(1, a.vocab, (a.prompt,), generator=g).tolist() for _ in range(a.decode_batch)]]

    def decode_steps():  # the per-step wall times of the decode steps (the first step is the prefill)
        return sample(engine.student, prompts, max_new_tokens=a.decode_steps, eos_id=-1, pad_id=0, temperature=0.0,
                      record_routing=False).stats.step_seconds[1:]

    train_step(engine, [batch])
    decode_steps()
    samples, trains, decodes = [], [], []
    for _ in range(a.reps):
        samples.append(probe.measure())
        trains.append(_best(lambda: train_step(engine, [batch]), 1))
        decodes.append(min(decode_steps()))
    cpu = {k: (max if k in ("matmul_flops", "memory_bytes_s") else min)(x[k] for x in samples) for k in samples[0]}
    dev = DeviceSpec("this CPU (1 thread, measured)", cpu["matmul_flops"], cpu["memory_bytes_s"], 0.0,
                     host_op_s=cpu["host_op_s"], host_train_op_s=cpu["host_train_op_s"], async_host=False,
                     matmul_efficiency=1.0, memory_efficiency=1.0, collective_latency_s=0.0)
    s = shapes_of(spec.model.hf_config)
    predicted_train = train_step_seconds(spec, dev, a.mbs * a.seq, a.seq / 2, teacher_forward=False)["seconds"]
    predicted_decode = decode_step_seconds(
        s, spec.layout, dev, a.decode_batch, a.prompt + a.decode_steps / 2,
        real_topk=s.topk * (1 - spec.model.null.target_share), z=spec.model.null.num, param_bytes=4)["seconds"]
    return {"cpu": cpu, "train_step": {"predicted_s": predicted_train, "measured_s": min(trains)},
            "decode_step": {"predicted_s": predicted_decode, "measured_s": min(decodes)}}


def main(argv=None) -> int:
    a = parse(argv)
    import torch

    torch.set_num_threads(1)
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    init_parallel(seed=0)
    probe = CpuProbe(a)
    results = {}
    for family in [f for f in a.families.split(",") if f]:
        results[family] = calibrate(a, family, probe)
    destroy_parallel()
    for family, r in results.items():
        cpu = r["cpu"]
        print(f"CPU spec next to {family} (measured in this run): {cpu['matmul_flops'] / 1e9:.1f} GFLOP/s fp32 "
              f"matmul, {cpu['memory_bytes_s'] / 1e9:.1f} GB/s copy, {cpu['host_op_s'] * 1e6:.1f} us per aten op "
              f"(forward), {cpu['host_train_op_s'] * 1e6:.1f} us (forward + backward)")
    print("| model | measure | predicted s | measured s | predicted / measured |")
    print("|---|---|---:|---:|---:|")
    ratios = {}
    for family, r in results.items():
        for name in ("train_step", "decode_step"):
            m = r[name]
            ratio = m["predicted_s"] / m["measured_s"]
            ratios[f"{family}_{name}"] = ratio
            print(f"| {family} | {name} | {m['predicted_s']:.4f} | {m['measured_s']:.4f} | {ratio:.2f} |")
    worst = max(max(r, 1 / r) for r in ratios.values())
    print(json.dumps({"ratios": ratios, "max_ratio": worst, "results": results,
                      "setting": vars(a)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
