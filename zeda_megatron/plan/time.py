"""Time plan: how long each phase of the Slurm job takes on a chosen GPU, from the same shapes and
resolved settings the memory plan reads (docs/time_plan.md: method, sources, calibration).

A step's time is the sum of
* compute: FLOPs / (peak x efficiency) or bytes / (HBM bandwidth x efficiency), whichever is larger
  (training: matmul-bound; a decode step: weight and KV reads);
* host: aten operations x host seconds per operation (eager execution; the decode step's MoE
  dispatcher syncs the host once per layer, so host and device time add up rather than overlap);
* communication: EP all-to-alls, TP collectives, DP gradient reduce-scatter + parameter all-gather, the
  CPU-offloaded optimizer's PCIe traffic and host Adam; checkpoint writes at ``ckpt_write_gbps``.

Stage 2 samples each step's sequences to the longest one (every rank steps until all are done), so its
sampling time follows the *maximum* of the step's response lengths; its training forward/backward runs
on micro-batches padded to that length. Lengths come from :mod:`.lengths` (a stated long-tailed
distribution, or real responses). :func:`time_plan` returns the table text and a dict.
"""

from __future__ import annotations

import math

import numpy as np

from zeda_megatron.plan.devices import DECODE_OPS, TRAIN_OPS, DeviceSpec, ops_of
from zeda_megatron.plan.lengths import SEED, Lengths
from zeda_megatron.plan.memory import inference_decode_batch, kv_bytes_per_token_layer, decode_batch
from zeda_megatron.plan.shapes import Shapes, layer_params, shapes_of, stage_params

PHASES = ("check", "rehearse", "convert", "generate", "prepare", "sft", "opd", "export", "evaluate")
REFERENCE_PROMPTS = 60000  # ZEDA-prompts-60k.jsonl (zeda_method.md section 4)
REFERENCE_OPD_STEPS = 321  # --num-rollout 321 (zeda_method.md section 5)
CKPT_WRITE_GBPS = 1.0  # filesystem write speed per node (slurm/job.py's job.ckpt_write_gbps default)
TOKENIZE_TOKENS_S = 2e6  # one process of a fast (Rust) HF tokenizer
# the rehearse phase: GLM-4.7-Flash 46 s (stage 1) + 137 s (stage 2), Qwen3-30B-A3B 60 + 129 s on the
# 2-core CPU machine (docs/rehearsal.md); a GPU node's host is not slower
REHEARSE_HOURS = 190 / 3600
RESTART_HOURS = 0.25  # per job run: start, model build, checkpoint load
GRACE_HOURS = 0.25  # the pre-time-limit signal's lead (slurm/job.py's job.grace_s = 900 s)
EVALUATE_HOURS = 0.25  # the embedded-corpus evaluation (held-out chunks, 500 problems, the dial): not modelled
BUILD_SECONDS = 300  # building/loading a model for convert and export
MONTE_CARLO = 64  # stage-2 steps drawn to average the longest-response effect


# ---- work per token -------------------------------------------------------------------------------------
def attention_flops(s: Shapes, ctx: float, latent: bool = False) -> float:
    """Score + weighted-sum FLOPs of one token attending to ``ctx`` positions, one layer, all heads."""
    if s.mla and latent:  # absorbed: scores over latent + rope, output in the latent
        return 2 * s.heads * ctx * (2 * s.kv_lora + s.qk_rope)
    qk, v = (s.qk_nope + s.qk_rope, s.v_head) if s.mla else (s.head_dim, s.head_dim)
    return 2 * s.heads * ctx * (qk + v)


def forward_flops_per_token(s: Shapes, z: int, real_topk: float, ctx: float) -> float:
    """One model's forward FLOPs per token (all GPUs of a replica together)."""
    total = 2 * s.vocab * s.hidden
    for m in s.moe_layers:
        p = layer_params(s, bool(m), z)
        total += 2 * (p["dense"] + (p["expert"] * real_topk / s.experts if m else 0)) + attention_flops(s, ctx)
    return total


def _link(dev: DeviceSpec, group: int) -> float:
    bw = dev.link_bytes_s if group <= dev.gpus_per_node else dev.network_bytes_s
    return max(bw, 1.0) * dev.link_efficiency


# ---- a training step ------------------------------------------------------------------------------------
def train_step_seconds(spec, dev: DeviceSpec, tokens: float, ctx: float, teacher_forward: bool) -> dict:
    """One optimizer step over ``tokens`` (global, as computed: padding included) with attention over
    ``ctx`` positions on average, on ``spec``'s layout."""
    s, lay, tr, opt = shapes_of(spec.model.hf_config), spec.layout, spec.trainer, spec.optim
    z, null = spec.model.null.num, spec.model.null.target_share
    passes = 3 + (1 if tr.recompute == "full" else 0)  # forward, backward (2x), recomputed forward
    flops = tokens * passes * forward_flops_per_token(s, z, s.topk * (1 - null), ctx)
    if teacher_forward:
        flops += tokens * forward_flops_per_token(s, 0, s.topk, ctx)
    compute = flops / (lay.world * dev.matmul_flops * dev.matmul_efficiency)
    host = tr.num_microbatches * ops_of(TRAIN_OPS, s.family, s.moe_layers) * dev.host_train_op_s
    # communication per GPU: EP all-to-alls (dispatch + combine per pass), TP all-gathers/reduce-scatters
    per_gpu = tokens / lay.world
    n_moe, pb = sum(s.moe_layers), tr.param_bytes
    a2a_passes = passes + (1 if teacher_forward else 0)
    a2a = a2a_passes * n_moe * 2 * per_gpu * s.topk * s.hidden * pb * (lay.ep - 1) / lay.ep
    tpc = a2a_passes * s.layers * 4 * per_gpu * s.hidden * pb * (lay.tp - 1)
    n_coll = tr.num_microbatches * a2a_passes * (2 * n_moe * (lay.ep > 1) + 4 * s.layers * (lay.tp > 1))
    comm = (a2a + tpc) / _link(dev, lay.world) + n_coll * dev.collective_latency_s
    stage = stage_params(s, z, tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp)[0]
    grads = stage["dense"] * (4 + pb) * (lay.dp - 1) / lay.dp / _link(dev, lay.world) if lay.dp > 1 else 0.0
    shard = stage["dense"] / lay.dp + stage["expert"] / lay.edp
    adam = shard * 28  # read param, grad, two moments; write param and moments (fp32)
    if opt.cpu_offload:
        step = shard * (4 + pb) / (dev.host_link_bytes_s * dev.host_link_efficiency) + adam / dev.host_adam_bytes_s
    else:
        step = adam / (dev.memory_bytes_s * dev.memory_efficiency)
    total = (max(compute, host) if dev.async_host else compute + host) + comm + grads + step
    return {"seconds": total, "compute_s": compute, "host_s": host, "comm_s": comm + grads, "optimizer_s": step}


# ---- decoding ---------------------------------------------------------------------------------------------
def decode_step_seconds(s: Shapes, layout, dev: DeviceSpec, batch: float, ctx: float, *, real_topk: float,
                        z: int, param_bytes: int = 2, mla_cache: str = "latent") -> dict:
    """One decode step of ``batch`` sequences per DP rank at a mean context of ``ctx`` tokens (every
    pipeline stage in turn; sequence parallelism off, so each TP rank routes the replica's tokens)."""
    tp, pp, ep, etp, dp = layout.tp, layout.pp, layout.ep, layout.etp, layout.dp
    eff_bw, eff_fl = dev.memory_bytes_s * dev.memory_efficiency, dev.matmul_flops * dev.matmul_efficiency
    kv = kv_bytes_per_token_layer(s, tp, mla_cache, param_bytes)
    hit = 1 - (1 - min(1.0, real_topk / s.experts)) ** (batch * dp)  # a local expert gets >= 1 token
    gpu = comm = 0.0
    link = _link(dev, layout.world)
    for m in s.moe_layers:
        p = layer_params(s, bool(m), z, tp, ep, etp)
        read = p["dense"] * param_bytes + p["expert"] * hit * param_bytes + batch * ctx * kv
        flops = 2 * batch * p["dense"] + batch * attention_flops(s, ctx, mla_cache == "latent") / tp
        if m:
            flops += 2 * batch * real_topk * 3 * s.moe_ffn * s.hidden / etp
        gpu += max(read / eff_bw, flops / eff_fl)
        if tp > 1:  # attention and MLP outputs all-reduced
            comm += 2 * (dev.collective_latency_s + 2 * batch * s.hidden * param_bytes * (tp - 1) / tp / link)
        if m and ep > 1:  # dispatch + combine
            comm += 2 * (dev.collective_latency_s + batch * real_topk * s.hidden * param_bytes * (ep - 1) / ep / link)
    out_bytes = s.vocab // tp * s.hidden * param_bytes
    gpu += max(out_bytes / eff_bw, 2 * batch * s.vocab * s.hidden / tp / eff_fl)
    comm += (pp - 1) * dev.collective_latency_s + dev.collective_latency_s  # stage sends, the step's host sync
    host = ops_of(DECODE_OPS, s.family, s.moe_layers) * dev.host_op_s
    return {"seconds": host + gpu + comm, "host_s": host, "device_s": gpu, "comm_s": comm}


def prefill_seconds(s: Shapes, layout, dev: DeviceSpec, tokens: float, ctx: float, real_topk: float, z: int,
                    budget: int = 8192) -> float:
    """Prompt tokens of one DP rank (chunks of ``budget`` tokens per step), matmul-bound."""
    gpus = layout.tp * layout.pp
    flops = tokens * forward_flops_per_token(s, z, real_topk, ctx)
    steps = math.ceil(tokens / budget)
    return flops / (gpus * dev.matmul_flops * dev.matmul_efficiency) + steps * ops_of(
        DECODE_OPS, s.family, s.moe_layers) * dev.host_op_s


def slot_occupancy(lengths: np.ndarray, slots: int) -> list[tuple[int, int]]:
    """(steps, sequences in flight) segments of one rank decoding ``lengths`` in ``slots`` refilled slots."""
    ends = np.zeros(min(slots, len(lengths)))
    events = []
    for n in lengths:  # each sequence takes the slot that frees first
        i = int(np.argmin(ends))
        events.append((ends[i], +1))
        ends[i] += n
        events.append((ends[i], -1))
    events.sort()
    out, live, t0 = [], 0, 0.0
    for t, d in events:
        if t > t0 and live:
            out.append((int(t - t0), live))
        live, t0 = live + d, t
    return out


# ---- phases -----------------------------------------------------------------------------------------------
def stage2_step(spec, dev: DeviceSpec, lengths: Lengths) -> dict:
    """Seconds of one stage-2 step: sampling (prefill + decode of the step's sequences in the decode
    batch's slots, all ranks until the longest is done), then the training step (teacher forward for the
    KL + the student's forward/backward on micro-batches padded to the longest sequence)."""
    s, lay, st, tr = shapes_of(spec.model.hf_config), spec.layout, spec.stage, spec.trainer
    z, real = spec.model.null.num, s.topk * (1 - spec.model.null.target_share)
    per_rank = tr.global_batch_size // lay.dp
    slots = min(decode_batch(spec), per_rank)
    prompt = lengths.prompt_mean()
    mean_ctx = lengths.moments(st.max_new_tokens)["ctx"]
    rng = np.random.default_rng(SEED)
    sample, train, decode, longest = [], [], [], []
    for _ in range(MONTE_CARLO):
        draw = lengths.draw(tr.global_batch_size, st.max_new_tokens, rng).reshape(lay.dp, per_rank)
        steps = 0.0
        # ranks step together: the step costs what the busiest rank costs; use the rank with the longest tail
        rank = draw[int(np.argmax(draw.sum(1)))]
        t = 0
        for n, live in slot_occupancy(rank, slots):
            ctx = prompt + t + n / 2 if slots >= per_rank else mean_ctx
            steps += n * decode_step_seconds(s, lay, dev, live, ctx, real_topk=real, z=z,
                                             param_bytes=tr.param_bytes)["seconds"]
            t += n
        pre = prefill_seconds(s, lay, dev, per_rank * prompt, prompt / 2, real, z)
        L = int(draw.max())
        padded = tr.global_batch_size * (prompt + L)
        tr_s = train_step_seconds(spec, dev, padded, (prompt + L) / 2, teacher_forward=True)["seconds"]
        sample.append(pre + steps)
        decode.append(steps)
        train.append(tr_s)
        longest.append(L)
    one = decode_step_seconds(s, lay, dev, slots, mean_ctx, real_topk=real, z=z, param_bytes=tr.param_bytes)
    return {"sample_s": float(np.mean(sample)), "decode_s": float(np.mean(decode)), "train_s": float(np.mean(train)),
            "step_s": float(np.mean(sample) + np.mean(train)), "decode_batch": slots,
            "decode_tokens_per_s": slots / one["seconds"], "decode_step": one, "mean_longest": float(np.mean(longest))}


def generation(spec, dev: DeviceSpec, lengths: Lengths, n_prompts: int, max_new: int, slots: int | None = None) -> dict:
    """The teacher's responses to ``n_prompts`` prompts: each DP rank keeps its decode batch (the
    largest that fits next to the teacher's weights) in flight, refilling slots as responses end."""
    s, lay = shapes_of(spec.model.hf_config), spec.layout
    prompt = lengths.prompt_mean()
    if slots is None:
        gpu = spec.layout.gpu_memory_bytes or int(dev.memory_gb * 1e9)
        slots = max(1, inference_decode_batch(s, tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp,
                                              seq_length=int(prompt * 2) + max_new, gpu_bytes=gpu))
    per_rank = math.ceil(n_prompts / lay.dp)
    draw = lengths.draw(per_rank, max_new, np.random.default_rng(SEED))
    mom = lengths.moments(max_new)
    one = decode_step_seconds(s, lay, dev, slots, mom["ctx"], real_topk=s.topk, z=0)
    steps_at: dict = {}  # sequences in flight -> decode steps spent so
    for n, live in slot_occupancy(draw, slots):
        steps_at[live] = steps_at.get(live, 0) + n
    decode = sum(n * decode_step_seconds(s, lay, dev, live, mom["ctx"], real_topk=s.topk, z=0)["seconds"]
                 for live, n in steps_at.items())
    pre = prefill_seconds(s, lay, dev, per_rank * prompt, prompt / 2, s.topk, 0)
    return {"hours": (decode + pre) / 3600, "decode_batch": slots, "decode_tokens_per_s": slots / one["seconds"],
            "response_tokens": int(draw.sum()) * lay.dp, "decode_step": one}


def _ckpt_hours(spec, steps: int) -> float:
    """Checkpoint writes of a training phase (params + fp32 optimizer state, every save_interval steps)."""
    sh = shapes_of(spec.model.hf_config)
    params = sum(sum(layer_params(sh, bool(m), spec.model.null.num).values()) for m in sh.moe_layers)
    params += 2 * sh.vocab * sh.hidden
    saves = (steps // spec.trainer.save_interval if spec.trainer.save_interval else 0) + 1
    nodes = max(1, math.ceil(spec.layout.world / 8))
    return saves * params * (spec.trainer.param_bytes + 12) / nodes / (CKPT_WRITE_GBPS * 1e9) / 3600


def time_plan(sft, opd, dev: DeviceSpec, lengths: Lengths, *, n_prompts: int = REFERENCE_PROMPTS,
              sft_steps: int | None = None, opd_steps: int = REFERENCE_OPD_STEPS,
              time_limit_hours: float | None = None) -> tuple[str, dict]:
    """(table text, {phase: {"hours": ...}} + a summary) for the Slurm job's phases, from the resolved
    stage-1 (``sft``) and stage-2 (``opd``) specs. ``sft_steps``: default one pass over ``n_prompts`` at
    stage 1's global batch (as the Slurm job sets it)."""
    s = shapes_of(opd.model.hf_config)
    max_new = opd.stage.max_new_tokens
    mom = lengths.moments(max_new)
    sft_steps = sft_steps or max(1, math.ceil(n_prompts / sft.trainer.global_batch_size))
    tokens1 = sft.trainer.global_batch_size * sft.trainer.seq_length
    doc = min(sft.trainer.seq_length, lengths.prompt_mean() + mom["mean"])
    t1 = train_step_seconds(sft, dev, tokens1, doc / 2, teacher_forward=sft.stage.kl_weight > 0)
    s2 = stage2_step(opd, dev, lengths)
    gen = generation(opd, dev, lengths, n_prompts, max_new)
    weights_gb = 2 * (sum(sum(layer_params(s, bool(m), 0).values()) for m in s.moe_layers) + 2 * s.vocab * s.hidden) / 1e9
    io = (2 * weights_gb / CKPT_WRITE_GBPS + BUILD_SECONDS) / 3600
    phases = {
        "check": {"hours": 0.02},
        "rehearse": {"hours": REHEARSE_HOURS},
        "convert": {"hours": io, "weights_gb": weights_gb},
        "generate": {k: v for k, v in gen.items() if k != "decode_step"},
        "prepare": {"hours": n_prompts * (lengths.prompt_mean() + mom["mean"]) / TOKENIZE_TOKENS_S / 3600},
        "sft": {"hours": (sft_steps * t1["seconds"]) / 3600 + _ckpt_hours(sft, sft_steps), "steps": sft_steps,
                "step_s": t1["seconds"], "tokens_per_step": tokens1,
                "epochs_of_data": sft_steps * tokens1 / (n_prompts * (lengths.prompt_mean() + mom["mean"]))},
        "opd": {"hours": opd_steps * s2["step_s"] / 3600 + _ckpt_hours(opd, opd_steps), "steps": opd_steps,
                "step_s": s2["step_s"], "sample_s": s2["sample_s"], "train_s": s2["train_s"],
                "decode_tokens_per_s": s2["decode_tokens_per_s"], "decode_batch": s2["decode_batch"],
                "mean_longest_response": s2["mean_longest"]},
        "export": {"hours": io},
        "evaluate": {"hours": EVALUATE_HOURS},
    }
    total = sum(p["hours"] for p in phases.values())
    summary = {"gpu": dev.name, "total_hours": total, "lengths": lengths.source, "mean_response": mom["mean"],
               "host_op_s": dev.host_op_s, "decode_step_s": {"opd": s2["decode_step"], "generate": gen["decode_step"]},
               "stage1_step": t1}
    if time_limit_hours:
        usable = time_limit_hours - RESTART_HOURS - GRACE_HOURS
        if usable <= 0:
            raise ValueError(f"--time={time_limit_hours} h leaves no time after the restart and grace period")
        runs = math.ceil(total / usable)
        summary["requeues"] = {"time_hours": time_limit_hours, "job_runs": runs, "requeues": runs - 1}
    return format_time_plan(phases, summary, s2, gen), {"time_plan": phases, "time_summary": summary}


def format_time_plan(phases: dict, summary: dict, s2: dict, gen: dict) -> str:
    d2, dg = s2["decode_step"], gen["decode_step"]
    what = {
        "check": "environment, inputs, both stages' configs",
        "rehearse": "both stages at full size on fake tensors, on the node's CPU",
        "convert": f"read + write {phases['convert']['weights_gb']:.0f} GB of weights",
        "generate": f"{gen['response_tokens']:,} response tokens, {gen['decode_batch']} slots per DP rank, "
                    f"{gen['decode_tokens_per_s']:.0f} decode tokens/s per DP rank (step {dg['seconds'] * 1e3:.0f} ms: "
                    f"host {dg['host_s'] * 1e3:.0f}, device {dg['device_s'] * 1e3:.0f}, comm {dg['comm_s'] * 1e3:.0f})",
        "prepare": "tokenise the stage-1 data",
        "sft": f"{phases['sft']['steps']} steps x {phases['sft']['step_s']:.0f} s "
               f"({phases['sft']['tokens_per_step']:,} tokens/step, {phases['sft']['epochs_of_data']:.1f} passes over "
               "the data) + checkpoints",
        "opd": f"{phases['opd']['steps']} steps x (sample {s2['sample_s']:.0f} s + train {s2['train_s']:.0f} s); "
               f"{s2['decode_batch']} slots, {s2['decode_tokens_per_s']:.0f} decode tokens/s per DP rank (step "
               f"{d2['seconds'] * 1e3:.0f} ms: host {d2['host_s'] * 1e3:.0f}, device {d2['device_s'] * 1e3:.0f}, comm "
               f"{d2['comm_s'] * 1e3:.0f}); longest response per step {s2['mean_longest']:.0f} tokens on average",
        "export": "read the checkpoint, write the HF folder",
        "evaluate": "embedded-corpus evaluation (not modelled)",
    }
    lines = [f"time plan on {summary['gpu']} (responses: {summary['lengths']}; mean {summary['mean_response']:.0f} "
             "tokens)", "", "| phase | hours | what |", "|---|---:|---|"]
    for name, p in phases.items():
        lines.append(f"| {name} | {p['hours']:.2f} | {what[name]} |")
    lines.append(f"| **total** | **{summary['total_hours']:.1f}** | |")
    if "requeues" in summary:
        r = summary["requeues"]
        lines.append(f"\nat --time {r['time_hours']:g} h per job run: {r['job_runs']} runs, {r['requeues']} requeues")
    return "\n".join(lines)


def parse_time_limit(value) -> float:
    """Slurm's --time (``MM``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) or a number of hours -> hours."""
    text = str(value).strip()
    try:
        if ":" not in text and "-" not in text:
            return float(text)
        days, _, rest = text.rpartition("-")
        parts = [float(x) for x in rest.split(":")]
        if not days and len(parts) == 2:  # MM:SS
            parts = [0.0, *parts]
        h, m, sec = (parts + [0.0, 0.0])[:3] if days else ([0.0] * (3 - len(parts)) + parts)
        return float(days or 0) * 24 + h + m / 60 + sec / 3600
    except ValueError:
        raise ValueError(f"--time={value!r}: hours, or Slurm's D-HH:MM:SS / HH:MM:SS") from None


def time_plan_for(overrides: list[str], gpu: str, *, lengths_path: str | None = None, time_limit=None,
                  world: int | None = None, n_prompts: int = REFERENCE_PROMPTS, sft_steps: int | None = None,
                  opd_steps: int = REFERENCE_OPD_STEPS) -> tuple[str, dict]:
    """:func:`time_plan` of the run the training ``overrides`` describe (both stages resolved from them)
    on ``gpu`` (h100 | h200 | a100)."""
    from zeda_megatron.plan.devices import device
    from zeda_megatron.plan.lengths import lengths_from_jsonl
    from zeda_megatron.spec import compose, resolve

    dev = device(gpu)
    lengths = lengths_from_jsonl(lengths_path) if lengths_path else Lengths()
    base = [o for o in overrides if not o.startswith("stage=")]
    specs = [resolve(compose([*base, f"stage={name}"], run_dir="."), world, inputs=False, on_gpu=True,
                     gpu_gb=dev.memory_gb) for name in ("sft", "opd")]
    return time_plan(*specs, dev, lengths, n_prompts=n_prompts, sft_steps=sft_steps, opd_steps=opd_steps,
                     time_limit_hours=None if time_limit is None else parse_time_limit(time_limit))
