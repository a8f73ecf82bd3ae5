"""Per-GPU memory model of a training run from its :class:`~zeda_megatron.spec.RunSpec` (no weights, no
GPU, no processes): :func:`memory_plan`.

What each part counts, per GPU (the worst pipeline stage), in megatron-core 0.19.2's terms:

* **student params**: bf16 (fp32 on CPU / ``trainer.precision=fp32``). Dense weights split by TP
  (embedding, output layer, attention projections, dense and shared-expert MLPs); norms, the router
  and MLA's down projections (Transformer Engine ``duplicated`` linears) replicated over TP; routed
  experts split by EP x ETP; layers by PP.
* **student grads**: megatron DDP's contiguous grad buffer, one element per parameter (not sharded,
  even with the distributed optimizer): fp32 with ``optim.grad_reduce_in_fp32`` (default), else the
  param dtype.
* **optimizer**: Adam's two fp32 moments, plus an fp32 master copy for bf16 params (12 B/param; 8 for
  fp32 params). The distributed optimizer shards it over the data-parallel group (dense params over
  DP = world/(TP*PP), experts over expert-DP = world/(ETP*EP*PP)). ``optim.optimizer_cpu_offload``
  with ``optim.optimizer_offload_fraction`` f moves f of it to host memory (megatron-core's
  HybridDeviceOptimizer; reported as host bytes, not GPU).
* **teacher params**: the original model (no null rows), frozen, same dtype and layout, no grads.
* **engine=deepspeed** (conf/engine/deepspeed.yaml): ZeRO replaces the DDP buffer and megatron's
  optimizer: an fp32 master partition + Adam's moments (12 B per parameter of this rank's partition:
  dense params over DP, experts over expert-DP); gradients full (ZeRO-1) or this rank's fp32
  partition + the reduce bucket (ZeRO-2/3); ZeRO-3 partitions the parameters too (+ the largest layer
  gathered). ``engine.offload_optimizer`` / ``engine.offload_param`` move them to host memory
  (reported as host bytes).
* **activations**: what the backward keeps for the micro-batches in flight (1F1B: up to PP of them on
  the first stage) at ``trainer.micro_batch_size x trainer.seq_length`` tokens, bf16. Full recompute
  (``trainer.recompute=full``) keeps only each layer's input plus one layer's working set. Routed rows
  assume every top-k slot is real (no null share; EP load imbalance is not modelled: the reserve covers
  some of it). The teacher's forward adds one layer's working set (no grad).
* **rollout KV cache** (stage 2): the student's K/V (megatron-core's StaticInferenceContext, as
  zeda_megatron.training.rollout decodes: one micro-batch per decode batch) for
  ``trainer.micro_batch_size`` sequences of ``trainer.seq_length`` tokens, split over
  TP by heads: GLM MLA is cached as full K and V (20 x (256 + 256) x 2 B = 20 KB/token/layer before TP),
  Qwen3 GQA as 4 KV heads x 128 x 2 x 2 B. It is freed before the training step: the peak is the larger
  of the rollout and the training phase.
* **loss logits**: the fused chunked KL (zeda_megatron.linear_kl): about six fp32 ``[chunk, V/TP]``
  temporaries plus the fp32 output-layer weight gradient accumulator.
* **reserve**: CUDA context, NCCL buffers, allocator fragmentation: 4 GiB + 5% of the GPU.
"""

from __future__ import annotations

from zeda_megatron.plan.shapes import Shapes, layer_params, param_counts, shapes_of, stage_layers, stage_params
from zeda_megatron.spec import RunSpec

GiB = 1024**3
RESERVE_FIXED = 4 * GiB
RESERVE_FRACTION = 0.05
DEFAULT_GPU_BYTES = 80 * 10**9  # what the reserve is sized for when no GPU size is given
LOSS_TEMPORARIES = 6  # fp32 [chunk, V/TP] tensors alive per chunk in linear_kl
UNFUSED_LOSS_FP32_TENSORS = 4  # fp32 [tokens, V/TP] tensors alive at once on the materialised-logits path
DEFAULT_CHUNK_ELEMENTS = 1 << 23  # linear_kl.DEFAULT_CHUNK_ELEMENTS
ADAM_STATE_BYTES = 8  # two fp32 moments per parameter
FP32_MASTER_BYTES = 4  # the fp32 main copy of a bf16 parameter
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
SAMPLING_LOGITS_COPIES = 2  # fp32 [V] logits + probabilities per decoded sequence


class PlanError(ValueError):
    """A layout that does not fit (or a config the plan cannot read); names the settings to change."""


def layer_activation(s: Shapes, spec: RunSpec, moe: bool) -> int:
    """Bytes one layer keeps for its backward at one micro-batch (no recompute), bf16."""
    lay, z = spec.layout, spec.model.null.num
    e = 2
    t = spec.trainer.micro_batch_size * spec.trainer.seq_length
    tsp = t // lay.tp if lay.sp else t
    tl = t // lay.tp  # tokens x (heads / TP) regions
    n = 4 * tsp * s.hidden  # norm inputs, residuals (sequence-parallel regions)
    if s.mla:
        n += 2 * t * (s.q_lora + s.kv_lora + s.qk_rope)  # down projections' outputs and their norms (duplicated)
        qk = s.qk_nope + s.qk_rope
        n += tl * s.heads * (3 * qk + (s.qk_nope + s.v_head) + 2 * qk + 2 * s.v_head)  # q, k, v, up-proj outs, attn out
    else:
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        n += tl * (3 * qkv + s.heads * s.head_dim)  # qkv out, normed/roped q,k, attn out
    if moe:
        rows = tsp * s.topk * lay.etp  # routed rows received by this rank (average; every slot real)
        width = s.moe_ffn // lay.etp
        n += rows * (2 * s.hidden + 3 * width)  # permuted input, fc1 out, act out, fc2 out
        n += 2 * tsp * (s.experts + z) * 2  # router logits and probabilities (fp32)
        n += tl * 3 * s.shared_ffn
    else:
        n += tl * 3 * s.dense_ffn
    return n * e


def rollout_bytes_per_sequence(s: Shapes, spec: RunSpec, layers: int) -> int:
    """KV cache of one decoded sequence of ``trainer.seq_length`` tokens on one GPU (``layers`` layers),
    plus its sampling logits."""
    tp = spec.layout.tp
    if s.mla:
        per_token_layer = s.heads // tp * (s.qk_nope + s.qk_rope + s.v_head) * 2
    else:
        per_token_layer = max(1, s.kv_heads // tp) * s.head_dim * 2 * 2
    return spec.trainer.seq_length * layers * per_token_layer + s.vocab * 4 * SAMPLING_LOGITS_COPIES


def memory_plan(spec: RunSpec) -> dict:
    """The plan as a dict (see the module docstring): per-GPU bytes by part for the worst pipeline stage,
    the peak, whether it fits ``spec.layout.gpu_memory_bytes``, host bytes, and the settings used."""
    lay, tr, opt_s, eng, stage = spec.layout, spec.trainer, spec.optim, spec.engine, spec.stage
    hf = spec.model.hf_config
    s = shapes_of(hf)
    z = spec.model.null.num
    counts = param_counts(hf, z)
    sizes = dict(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp)
    student = stage_params(s, z, **sizes)
    teacher = stage_params(s, 0, **sizes)
    worst = max(range(lay.pp), key=lambda i: student[i]["dense"] + student[i]["expert"] + (lay.pp - i))
    sp_, tp_ = student[worst], teacher[worst]
    n_student = sp_["dense"] + sp_["expert"]
    pb = tr.param_bytes
    parts = {}
    parts["student_params"] = n_student * pb
    parts["student_grads"] = n_student * (4 if opt_s.grad_reduce_in_fp32 else pb)
    per_param_opt = ADAM_STATE_BYTES + (FP32_MASTER_BYTES if pb == 2 else 0)
    opt_elems = (sp_["dense"] / lay.dp + sp_["expert"] / lay.edp) if opt_s.distributed_optimizer else n_student
    opt = opt_elems * per_param_opt
    host = 0.0
    if opt_s.cpu_offload:
        # fp32 param copy + 2 moments + pinned fp32 grad on the host
        host = opt * opt_s.offload_fraction * (ADAM_STATE_BYTES + 2 * FP32_MASTER_BYTES) / per_param_opt
        opt = opt * (1 - opt_s.offload_fraction)
    host_params = 0.0
    if eng.deepspeed:
        opt, host, host_params = deepspeed_parts(parts, sp_, s, spec)
    parts["optimizer_states"] = int(opt)
    parts["teacher_params"] = (tp_["dense"] + tp_["expert"]) * pb
    # activations of the training step
    layers = stage_layers(s, lay.pp, worst)
    layer_acts = [layer_activation(s, spec, bool(m)) for m in layers]
    t = tr.micro_batch_size * tr.seq_length
    tsp = t // lay.tp if lay.sp else t
    in_flight = min(lay.pp - worst, tr.num_microbatches)
    if tr.recompute == "full":
        kept = len(layers) * tsp * s.hidden * 2
        acts = in_flight * kept + 2 * max(layer_acts)
    else:
        acts = in_flight * sum(layer_acts) + max(layer_acts)
    acts += max(layer_acts) + 2 * tsp * s.hidden * 2  # the teacher's forward working set, both hidden outputs
    parts["activations"] = int(acts)
    # loss: fused chunked KL on the last stage
    v_local = s.vocab // lay.tp
    chunk = max(1, DEFAULT_CHUNK_ELEMENTS // v_local)
    if stage.fused_loss:
        parts["loss_logits"] = LOSS_TEMPORARIES * min(chunk, t) * v_local * 4 + v_local * s.hidden * 4
    else:  # materialised: student logits (params dtype) + fp32 copies of both, log-softmax, their gradient
        parts["loss_logits"] = t * v_local * (pb + UNFUSED_LOSS_FP32_TENSORS * 4)
    # stage-2 rollout KV cache (freed before the training step)
    rollout_batch = tr.micro_batch_size
    per_sequence = rollout_bytes_per_sequence(s, spec, len(layers)) if stage.needs_sampling else 0
    parts["rollout_kv_cache"] = int(rollout_batch * per_sequence)
    gpu = lay.gpu_memory_bytes
    parts["reserve"] = int(RESERVE_FIXED + RESERVE_FRACTION * (gpu or DEFAULT_GPU_BYTES))
    static = sum(parts[k] for k in ("student_params", "student_grads", "optimizer_states", "teacher_params", "reserve"))
    train_peak = parts["activations"] + parts["loss_logits"]
    # while sampling, the grad buffers and the optimizer states on the GPU are offloaded (training/rollout.offloaded)
    rollout_static = static - (parts["student_grads"] + parts["optimizer_states"] if stage.offload_while_sampling else 0)
    peak = max(static + train_peak, rollout_static + parts["rollout_kv_cache"])
    fits = None if gpu is None else peak <= gpu
    # the largest decode batch (sequences of seq_length decoded together per rank) that fits while sampling
    rollout_batch_max = int((gpu - rollout_static) // per_sequence) if (gpu and per_sequence) else None
    return {
        "total_params": counts["original"],
        "student_params": counts["student"],
        "null_router_rows": counts["null_router_rows"],
        "router_bias": {"original": counts["original_router_bias"], "student": counts["student_router_bias"]},
        "per_gpu_params": {"student": n_student, "student_dense": sp_["dense"], "student_expert": sp_["expert"],
                           "teacher": tp_["dense"] + tp_["expert"]},
        "per_gpu_bytes": parts,
        "gpu_bytes": int(peak),
        "gpu_capacity_bytes": gpu,
        "headroom_bytes": None if gpu is None else int(gpu - peak),
        "fits": fits,
        "fixes": [],
        "host_optimizer_bytes": int(host),
        "host_param_bytes": int(host_params),
        "layout": {"world": lay.world, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "etp": lay.etp, "dp": lay.dp,
                   "expert_dp": lay.edp, "sequence_parallel": lay.sp},
        "settings": {"stage": stage.name, "tokens_per_microbatch": t, "micro_batch_size": tr.micro_batch_size,
                     "seq_length": tr.seq_length, "microbatches_in_flight": in_flight, "param_dtype":
                     "fp32" if pb == 4 else "bf16", "grad_dtype": "fp32" if opt_s.grad_reduce_in_fp32 or pb == 4 else "bf16",
                     "engine": eng.name, "zero_stage": eng.zero_stage, "offload_optimizer": eng.offload_optimizer,
                     "offload_param": eng.offload_param,
                     "recompute": tr.recompute or "none", "distributed_optimizer": opt_s.distributed_optimizer,
                     "optimizer_cpu_offload": opt_s.cpu_offload,
                     "optimizer_offload_fraction": opt_s.offload_fraction if opt_s.cpu_offload else 0.0,
                     "rollout_batch": rollout_batch if stage.needs_sampling else 0,
                     "rollout_batch_max": rollout_batch_max if stage.needs_sampling else None,
                     "offload_while_sampling": stage.offload_while_sampling, "null_experts": z,
                     "worst_pipeline_stage": worst},
    }


def deepspeed_parts(parts: dict, sp_: dict, s: Shapes, spec: RunSpec) -> tuple[float, float, float]:
    """engine=deepspeed (ZeRO, zeda_megatron/training/ds_engine.py): per-GPU student params/grads
    (updates ``parts``) and (optimizer GPU bytes, optimizer host bytes, param host bytes).

    ZeRO keeps an fp32 master partition (also for fp32 params) + Adam's two moments: 12 B per
    parameter of this rank's partition (dense params over DP, experts over expert-DP). ZeRO-1:
    full gradients (param dtype); ZeRO-2/3: this rank's gradient partition (fp32) plus the reduce
    bucket; ZeRO-3: this rank's parameter partition plus the largest layer gathered.
    ``offload_optimizer``: optimizer states (and the fp32 gradient partition) in host memory;
    ``offload_param`` (ZeRO-3): the parameter partition in host memory."""
    lay, eng = spec.layout, spec.engine
    pb = spec.trainer.param_bytes
    n = sp_["dense"] + sp_["expert"]
    shard = sp_["dense"] / lay.dp + sp_["expert"] / lay.edp
    opt = shard * (ADAM_STATE_BYTES + FP32_MASTER_BYTES)
    if eng.zero_stage >= 2:
        grads = shard * 4 + min(n, DS_REDUCE_BUCKET) * pb
    else:
        grads = n * pb
    z = spec.model.null.num
    largest_layer = max((sum(layer_params(s, bool(m), z, lay.tp, lay.ep, lay.etp).values()) for m in s.moe_layers),
                        default=0)
    params = n * pb
    host_params = 0.0
    if eng.zero_stage == 3:
        params = shard * pb + largest_layer * pb
        if eng.offload_param:
            host_params = shard * pb
            params = largest_layer * pb
    host = 0.0
    if eng.offload_optimizer:
        host = opt + shard * 4  # + the fp32 gradient partition the CPU step reads
        opt = 0.0
    parts["student_params"] = int(params)
    parts["student_grads"] = int(grads)
    return opt, host, host_params
