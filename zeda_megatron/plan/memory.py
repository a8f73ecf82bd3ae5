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
* **activations**: the most the training step holds for the backward at ``trainer.micro_batch_size x
  trainer.seq_length`` tokens, bf16, for the micro-batches in flight (1F1B: up to PP of them on the first
  stage). Full recompute (``trainer.recompute=full``) keeps each layer's input plus one layer's
  recomputed backward: ``RECOMPUTE_ROUTED`` / ``RECOMPUTE_REST`` times its routed rows' / other
  activations (measured by the fake-tensor rehearsal, docs/rehearsal.md). Routed rows assume every
  top-k slot is real (no null share; EP load imbalance is not modelled: the reserve covers some of it).
  The peak at the loss (what the forward kept, the gathered final hidden states and the loss) is
  compared apart.
* **rollout KV cache** (stage 2): zeda_megatron.training.rollout's per-slot cache, one slot of
  ``trainer.seq_length`` positions per sequence in flight (plus a scratch slot) on every layer of the
  stage: GQA caches K and V of this TP rank's KV heads (Qwen3: 4 heads x 128 x 2 x 2 B before TP); MLA
  caches the compressed latent and the rope key, ``(kv_lora_rank + qk_rope_head_dim) x 2 B`` per token
  and layer on every TP rank (GLM: 576 x 2 B; the full K/V would be 20 x (256 + 256) x 2 B / TP); plus
  the slot's uniforms and sampling logits, plus one sampler step's working set (``TOKEN_BUDGET`` tokens,
  :func:`prefill_bytes`). The decode batch (``stage.decode_batch``; auto: the largest that fits, at most
  the step's sequences per DP rank) sets the number of slots. It is freed before the training step: the
  peak is the larger of the rollout and the training phase.
* **loss logits**: the fused chunked KL (zeda_megatron.linear_kl): the fp32 gradients of the gathered
  hidden states ``[tokens, h]`` and of the output weight ``[V/TP, h]``, plus the larger of about six fp32
  ``[chunk, V/TP]`` temporaries and those gradients' copies in the param dtype.
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
ROUTED_HIDDEN_COPIES = 6  # [rows, hidden] tensors a MoE layer's forward makes per routed row
ROUTED_FFN_COPIES = 4  # [rows, moe_ffn] tensors (fc1's two halves, the activation, prob-weighted)
# Under full recompute, the backward of one layer holds its recomputed forward plus the gradients being
# formed: measured by the rehearsal (docs/rehearsal.md) at the reference layout as these multiples of
# the layer's activations: its routed rows and the rest (attention, norms, router, shared expert).
# The sampler feeds at most this many tokens per step (decode tokens + prompt chunks; its default:
# zeda_megatron.training.rollout.sample). A prefill step's working set, forward only with sequence
# parallelism off, is this share of the routed rows' tensors of TOKEN_BUDGET tokens (measured, as above).
TOKEN_BUDGET = 8192
PREFILL_ROUTED = 0.78
RECOMPUTE_ROUTED = 1.36
RECOMPUTE_REST = 0.83


class PlanError(ValueError):
    """A layout that does not fit (or a config the plan cannot read); names the settings to change."""


def layer_activation(s: Shapes, spec: RunSpec, moe: bool, routed_only: bool = False) -> int:
    """Bytes one layer keeps for its backward at one micro-batch (no recompute), bf16; with
    ``routed_only`` the routed experts' rows alone."""
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
    routed = 0
    if moe:
        rows = tsp * s.topk * lay.etp  # routed rows received by this rank (average; every slot real)
        width = s.moe_ffn // lay.etp
        # [rows, hidden]: permuted, after the all-to-all, sorted by local expert, the experts' outputs
        # gathered, unsorted, after the return all-to-all; [rows, width]: fc1 out (2), act out, weighted
        routed = rows * (ROUTED_HIDDEN_COPIES * s.hidden + ROUTED_FFN_COPIES * width)
        n += routed
        n += 2 * tsp * (s.experts + z) * 2  # router logits and probabilities (fp32)
        n += tl * 3 * s.shared_ffn
    else:
        n += tl * 3 * s.dense_ffn
    return (routed if routed_only else n) * e


def kv_bytes_per_token_layer(s: Shapes, tp: int, mla_cache: str = "latent", dtype_bytes: int = 2) -> int:
    """The rollout cache's bytes per token and layer on one GPU: MLA's latent + rope key (the same on
    every TP rank: the down projection is TP-replicated) or, with ``mla_cache="full"``, K and V of this
    rank's heads; GQA: K and V of this rank's KV heads."""
    if s.mla:
        if mla_cache == "latent":
            return (s.kv_lora + s.qk_rope) * dtype_bytes
        return s.heads // tp * (s.qk_nope + s.qk_rope + s.v_head) * dtype_bytes
    return max(1, s.kv_heads // tp) * s.head_dim * 2 * dtype_bytes


def rollout_bytes_per_sequence(s: Shapes, spec: RunSpec, layers: int) -> int:
    """One decode slot on one GPU: its cache of ``trainer.seq_length`` positions on ``layers`` layers,
    its uniforms and its sampling logits."""
    seq = spec.trainer.seq_length
    cache = seq * layers * kv_bytes_per_token_layer(s, spec.layout.tp, dtype_bytes=spec.trainer.param_bytes)
    return cache + seq * 4 + s.vocab * 4 * SAMPLING_LOGITS_COPIES


def prefill_bytes(s: Shapes, spec: RunSpec) -> int:
    """The working set of one sampler step of TOKEN_BUDGET tokens (forward only, sequence parallelism off:
    every TP rank routes all of them): PREFILL_ROUTED of its routed rows' tensors."""
    lay = spec.layout
    rows = TOKEN_BUDGET * s.topk * lay.etp
    return int(PREFILL_ROUTED * rows * (ROUTED_HIDDEN_COPIES * s.hidden + ROUTED_FFN_COPIES * s.moe_ffn // lay.etp) * 2)


def sequences_per_rank(spec: RunSpec) -> int:
    """Sequences one data-parallel rank samples per step (every one of them may be in flight)."""
    return spec.trainer.micro_batch_size * spec.trainer.num_microbatches


def decode_batch(spec: RunSpec) -> int:
    """The decode slots the stage-2 sampler keeps per DP rank: ``stage.decode_batch``, or (auto) the
    largest number that fits while sampling, at most the step's sequences per rank."""
    return memory_plan(spec)["settings"]["rollout_batch"] or sequences_per_rank(spec)


def inference_decode_batch(s: Shapes, *, tp: int, pp: int, ep: int, etp: int, seq_length: int, gpu_bytes: int,
                           param_bytes: int = 2) -> int:
    """Generation (the teacher alone, no training state): the largest decode batch per DP rank whose
    slots of ``seq_length`` positions fit next to the weights and the reserve (0: not even one)."""
    stage = stage_params(s, 0, tp=tp, pp=pp, ep=ep, etp=etp)
    worst = max(range(pp), key=lambda i: stage[i]["dense"] + stage[i]["expert"])
    weights = (stage[worst]["dense"] + stage[worst]["expert"]) * param_bytes
    reserve = RESERVE_FIXED + RESERVE_FRACTION * gpu_bytes
    per_slot = (seq_length * len(stage_layers(s, pp, worst)) * kv_bytes_per_token_layer(s, tp, dtype_bytes=param_bytes)
                + seq_length * 4 + s.vocab * 4 * SAMPLING_LOGITS_COPIES)
    return max(0, int((gpu_bytes - weights - reserve) // per_slot) - 1)  # - 1: the scratch slot


def memory_plan(spec: RunSpec, pipeline_stage: int | None = None) -> dict:
    """The plan as a dict (see the module docstring): per-GPU bytes by part for the worst pipeline stage
    (or ``pipeline_stage``),
    the peak, whether it fits ``spec.layout.gpu_memory_bytes``, host bytes, and the settings used."""
    lay, tr, opt_s, eng, stage = spec.layout, spec.trainer, spec.optim, spec.engine, spec.stage
    hf = spec.model.hf_config
    s = shapes_of(hf)
    z = spec.model.null.num
    counts = param_counts(hf, z)
    sizes = dict(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp)
    student = stage_params(s, z, **sizes)
    teacher = stage_params(s, 0, **sizes)
    worst = max(range(lay.pp), key=lambda i: student[i]["dense"] + student[i]["expert"] + (lay.pp - i)) \
        if pipeline_stage is None else pipeline_stage
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
    kept_at_loss = 0
    if tr.recompute == "full":
        kept = len(layers) * tsp * s.hidden * 2  # each layer's input
        routed = [layer_activation(s, spec, bool(m), routed_only=True) for m in layers]
        acts = in_flight * kept + max(RECOMPUTE_ROUTED * r + RECOMPUTE_REST * (a - r) for a, r in zip(layer_acts, routed))
        kept_at_loss = in_flight * kept
    else:
        acts = in_flight * sum(layer_acts) + max(layer_acts)
        kept_at_loss = in_flight * sum(layer_acts)
    parts["activations"] = int(acts)
    # loss: the fused chunked KL on the last stage (zeda_megatron.linear_kl): fp32 gradients of the
    # gathered hidden states [t, h] and of the output weight [V/TP, h], then their copies in the param
    # dtype (the larger of those and the chunk's fp32 [chunk, V/TP] temporaries)
    v_local = s.vocab // lay.tp
    chunk = max(1, DEFAULT_CHUNK_ELEMENTS // v_local)
    if stage.fused_loss:
        grads = (t + v_local) * s.hidden
        parts["loss_logits"] = grads * 4 + max(LOSS_TEMPORARIES * min(chunk, t) * v_local * 4, grads * pb)
    else:  # materialised: student logits (params dtype) + fp32 copies of both, log-softmax, their gradient
        parts["loss_logits"] = t * v_local * (pb + UNFUSED_LOSS_FP32_TENSORS * 4)
    if pipeline_stage is not None and pipeline_stage != lay.pp - 1:
        parts["loss_logits"] = 0  # (a stage asked for by name: only the last one computes the loss)
    # at the loss: what the forward kept plus the gathered final hidden states (the teacher's too)
    kept_at_loss += t * s.hidden * pb * (2 if (stage.kl_weight > 0) else 1)
    # stage-2 rollout KV cache (freed before the training step): one slot per sequence in flight + a scratch slot
    per_sequence = rollout_bytes_per_sequence(s, spec, len(layers)) if stage.needs_sampling else 0
    gpu = lay.gpu_memory_bytes
    parts["reserve"] = int(RESERVE_FIXED + RESERVE_FRACTION * (gpu or DEFAULT_GPU_BYTES))
    static = sum(parts[k] for k in ("student_params", "student_grads", "optimizer_states", "teacher_params", "reserve"))
    train_peak = max(parts["activations"], kept_at_loss + parts["loss_logits"])
    # while sampling, the grad buffers and the optimizer states on the GPU are offloaded (training/offload.py)
    rollout_static = static - (parts["student_grads"] + parts["optimizer_states"] if stage.offload_while_sampling else 0)
    # the largest decode batch (slots of seq_length positions per rank) that fits while sampling
    rollout_batch_max = max(0, int((gpu - rollout_static) // per_sequence) - 1) if (gpu and per_sequence) else None
    wanted = sequences_per_rank(spec)
    if stage.decode_batch is not None:
        rollout_batch = min(stage.decode_batch, wanted)
    else:
        rollout_batch = wanted if rollout_batch_max is None else max(1, min(wanted, rollout_batch_max))
    parts["rollout_kv_cache"] = int((rollout_batch + 1) * per_sequence + prefill_bytes(s, spec)) \
        if stage.needs_sampling else 0
    peak = max(static + train_peak, rollout_static + parts["rollout_kv_cache"])
    fits = None if gpu is None else peak <= gpu
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
