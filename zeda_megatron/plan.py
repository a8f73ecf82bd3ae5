"""Per-GPU memory plan of a training run, from the config alone (no weights, no GPU, no processes).

    python -m zeda_megatron.plan model=qwen3_30b_a3b parallel=reference_8gpu stage=sft [gpu_gb=80] [world=8]

Same Hydra config tree as ``zeda_megatron.train`` (conf/config.yaml); any override works. Parameter
counts come from the HF config's shapes (``model.hf_config``, or ``model.hf_dir/config.json``); the
layout from ``parallel.*`` (world size: ``world=``, else ``parallel.gpus``, else the smallest world the
layout needs). Prints a table and the headroom on a GPU of ``gpu_gb`` GB (default: ``parallel.gpu_memory_gb``,
else 80), then one JSON line with ``total_params``, ``student_params``, ``per_gpu_bytes`` (by part),
``gpu_bytes`` (the peak) and ``fits``. The trainer runs the same plan in its config validation
(:func:`check_config`) and refuses a layout that does not fit, naming the settings that would.

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

import json
import math
import os
import sys
from dataclasses import dataclass, field

GiB = 1024**3
GB = 10**9
RESERVE_FIXED = 4 * GiB
RESERVE_FRACTION = 0.05
LOSS_TEMPORARIES = 6  # fp32 [chunk, V/TP] tensors alive per chunk in linear_kl
UNFUSED_LOSS_FP32_TENSORS = 4  # fp32 [tokens, V/TP] tensors alive at once on the materialised-logits path
DEFAULT_CHUNK_ELEMENTS = 1 << 23  # linear_kl.DEFAULT_CHUNK_ELEMENTS


class PlanError(ValueError):
    """A layout that does not fit (or a config the plan cannot read); names the settings to change."""


# ---- parameter counts from the HF config ------------------------------------------------------------
@dataclass
class Shapes:
    family: str  # qwen3_moe | glm4_moe_lite
    layers: int
    hidden: int
    vocab: int
    experts: int
    topk: int
    moe_ffn: int
    dense_ffn: int
    moe_layers: list
    tied: bool
    heads: int
    kv_heads: int
    head_dim: int
    shared_ffn: int = 0
    q_lora: int = 0
    kv_lora: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0


def shapes_of(hf: dict) -> Shapes:
    """The dimensions the plan needs, through the bridge's own reading of the HF config."""
    from zeda_megatron.bridge.hf_config import GLM, model_info

    info = model_info(hf)
    heads = int(hf["num_attention_heads"])
    common = dict(
        family=info.family, layers=info.num_layers, hidden=info.hidden_size, vocab=info.vocab_size,
        experts=info.num_experts, topk=int(hf["num_experts_per_tok"]), moe_ffn=int(hf["moe_intermediate_size"]),
        dense_ffn=int(hf["intermediate_size"]), moe_layers=list(info.moe_layers), tied=info.tie_word_embeddings,
        heads=heads,
    )
    if info.family == GLM:
        return Shapes(
            **common, kv_heads=heads, head_dim=int(hf["v_head_dim"]),
            shared_ffn=int(hf["moe_intermediate_size"]) * int(hf.get("n_shared_experts", 1) or 0),
            q_lora=int(hf["q_lora_rank"]), kv_lora=int(hf["kv_lora_rank"]), qk_nope=int(hf["qk_nope_head_dim"]),
            qk_rope=int(hf["qk_rope_head_dim"]), v_head=int(hf["v_head_dim"]),
        )
    return Shapes(**common, kv_heads=int(hf["num_key_value_heads"]),
                  head_dim=int(hf.get("head_dim") or info.hidden_size // heads))


def _layer_params(s: Shapes, moe: bool, z: int, tp: int = 1, ep: int = 1, etp: int = 1) -> dict:
    """One decoder layer's parameters on one GPU: {"dense": n, "expert": n} (TP/EP-split)."""
    h = s.hidden
    dense = 2 * h  # input_layernorm + pre_mlp_layernorm (TE: fused into the next linear; same size)
    if s.q_lora:  # MLA (GLM)
        dense += h * s.q_lora + s.q_lora  # q_down (duplicated over TP) + q latent norm
        dense += h * (s.kv_lora + s.qk_rope) + s.kv_lora  # kv_down (duplicated) + kv latent norm
        dense += s.q_lora * s.heads * (s.qk_nope + s.qk_rope) // tp  # q_up
        dense += s.kv_lora * s.heads * (s.qk_nope + s.v_head) // tp  # kv_up
        dense += s.heads * s.v_head * h // tp  # linear_proj
    else:  # GQA with per-head QK norm (Qwen3)
        dense += h * (s.heads + 2 * s.kv_heads) * s.head_dim // tp  # linear_qkv
        dense += s.heads * s.head_dim * h // tp  # linear_proj
        dense += 2 * s.head_dim  # q_layernorm, k_layernorm
    expert = 0
    if moe:
        dense += (s.experts + z) * h  # router (replicated; E real + Z null rows)
        dense += 3 * s.shared_ffn * h // tp  # shared expert fc1 [gate; up] + fc2
        expert = (s.experts // ep) * 3 * s.moe_ffn * h // etp
    else:
        dense += 3 * s.dense_ffn * h // tp
    return {"dense": dense, "expert": expert}


def param_counts(hf: dict, num_null_experts: int = 0) -> dict:
    """Whole-model counts: ``original`` (what transformers' model has: parameters only, MTP layers
    excluded as transformers builds none), ``student`` (plus Z router rows per MoE layer), and the
    router bias buffers (GLM's e_score_correction_bias: E, the student's E+Z)."""
    s = shapes_of(hf)
    out = {}
    for name, z in (("original", 0), ("student", num_null_experts)):
        n = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden  # embedding, output layer, final norm
        for moe in s.moe_layers:
            p = _layer_params(s, bool(moe), z)
            n += p["dense"] + p["expert"]
        out[name] = n
    n_moe = sum(s.moe_layers)
    bias = s.family == "glm4_moe_lite"
    out["original_router_bias"] = n_moe * s.experts if bias else 0
    out["student_router_bias"] = n_moe * (s.experts + num_null_experts) if bias else 0
    out["null_router_rows"] = n_moe * num_null_experts * s.hidden
    return out


# ---- the layout and the run settings the plan reads ---------------------------------------------
@dataclass
class Settings:
    world: int
    tp: int
    pp: int
    ep: int
    etp: int
    sp: bool
    dp: int
    edp: int
    stage: str
    seq: int
    mbs: int
    gbs: int
    num_microbatches: int
    param_bytes: int
    recompute: str | None
    dist_opt: bool
    grad_fp32: bool
    offload: bool
    offload_fraction: float
    rollout_batch: int
    gpu_bytes: int | None
    z: int
    on_gpu: bool = True
    engine: str = "megatron"  # conf/engine: megatron | deepspeed
    zero_stage: int = 0  # engine=deepspeed: ZeRO stage 1/2/3
    ds_offload_optimizer: bool = False
    ds_offload_param: bool = False
    fused_loss: bool = True  # stage.fused_loss: output layer + losses per token chunk (linear_kl)
    offload_while_sampling: bool = False  # stage.offload_while_sampling: grads + optimizer leave the GPU while sampling
    notes: list = field(default_factory=list)


def _get(cfg, path, default=None):
    node = cfg
    for part in path.split("."):
        if node is None:
            return default
        try:
            node = node[part]
        except Exception as e:
            if type(e).__name__ == "MissingMandatoryValue":
                raise PlanError(f"{path} is not set (???); set it on the command line, e.g. {path}=...") from e
            return default
    return default if node is None else node


def _container(x):
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


def hf_config_of(cfg) -> dict:
    """model.hf_dir/config.json when model.hf_dir is set (authoritative), else model.hf_config."""
    try:
        hf_dir = _get(cfg, "model.hf_dir")
    except PlanError:  # ??? (the released models' presets): the shapes in model.hf_config are enough
        hf_dir = None
    if hf_dir:
        path = os.path.join(str(hf_dir), "config.json")
        if not os.path.isfile(path):
            raise PlanError(f"model.hf_dir={hf_dir!r} has no config.json")
        with open(path) as f:
            return json.load(f)
    hf = _container(_get(cfg, "model.hf_config"))
    if not hf:
        raise PlanError("model.hf_dir and model.hf_config are both null: the plan needs the model's shapes")
    return dict(hf)


def num_null_of(cfg, num_experts: int) -> int:
    from zeda_megatron.routing import num_null_from_ratio

    num = _get(cfg, "model.null_experts.num")
    if num is not None:
        return int(num)
    ratio = _get(cfg, "model.null_experts.ratio")
    return num_null_from_ratio(num_experts, float(ratio)) if ratio is not None else 0


def gpu_memory_bytes(cfg, gpu_gb=None) -> int | None:
    """GPU size to plan against: ``gpu_gb`` (GB), else ``parallel.gpu_memory_gb`` (a number, or auto:
    this machine's GPU; none on CPU), else None (no fit check)."""
    v = gpu_gb if gpu_gb is not None else _get(cfg, "parallel.gpu_memory_gb", "auto")
    if v in (None, False) or (isinstance(v, str) and v.lower() in ("null", "none", "off", "false")):
        return None
    if isinstance(v, str) and v.lower() == "auto":
        from zeda_megatron.platform import on_cpu

        if on_cpu():
            return None
        import torch

        # this process's own GPU (LOCAL_RANK), so that the check, run before torch.cuda.set_device, never
        # touches another rank's device
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        return int(torch.cuda.get_device_properties(index).total_memory)
    return int(float(v) * GB)


def settings_of(cfg, world: int | None = None, gpu_gb=None, *, on_gpu: bool | None = None) -> Settings:
    hf = hf_config_of(cfg)
    s = shapes_of(hf)
    z = num_null_of(cfg, s.experts)
    tp, pp, ep = (int(_get(cfg, f"parallel.{k}", 1)) for k in ("tp", "pp", "ep"))
    etp = int(_get(cfg, "parallel.etp") or tp)
    sp = bool(_get(cfg, "parallel.sequence_parallel", False))
    if world is None:
        world = _get(cfg, "parallel.gpus")
    if world is None:
        world = math.lcm(tp * pp, etp * ep * pp)
    world = int(world)
    if world % (tp * pp) or world % (etp * ep * pp):
        raise PlanError(f"world size {world} is not a multiple of tp*pp={tp * pp} and etp*ep*pp={etp * ep * pp}")
    dp, edp = world // (tp * pp), world // (etp * ep * pp)
    if on_gpu is None:
        from zeda_megatron.platform import on_cpu

        on_gpu = not on_cpu()
    precision = str(_get(cfg, "trainer.precision", "auto"))
    fp32 = precision == "fp32" or (precision == "auto" and not on_gpu)
    rec = str(_get(cfg, "trainer.recompute", False)).lower()
    recompute = {"false": None, "none": None, "true": "full", "full": "full", "selective": "selective"}.get(rec)
    d = _get(cfg, "optim.use_distributed_optimizer", "auto")
    dist_opt = on_gpu if d in ("auto", None) else bool(d)
    mbs, gbs = int(_get(cfg, "trainer.micro_batch_size", 1)), int(_get(cfg, "trainer.global_batch_size", 1))
    stage = str(_get(cfg, "stage.name", "sft"))
    engine = str(_get(cfg, "engine.name", "megatron"))
    ds = engine == "deepspeed"
    if ds:
        dist_opt = False  # megatron's distributed optimizer is not used: ZeRO partitions instead
    return Settings(
        engine=engine, zero_stage=int(_get(cfg, "engine.zero_stage", 2)) if ds else 0,
        ds_offload_optimizer=ds and bool(_get(cfg, "engine.offload_optimizer", False)),
        ds_offload_param=ds and bool(_get(cfg, "engine.offload_param", False)),
        world=world, tp=tp, pp=pp, ep=ep, etp=etp, sp=sp, dp=dp, edp=edp, stage=stage,
        seq=int(_get(cfg, "trainer.seq_length", 1)), mbs=mbs, gbs=gbs, num_microbatches=max(1, gbs // max(1, mbs * dp)),
        param_bytes=4 if fp32 else 2, recompute=recompute, dist_opt=dist_opt,
        grad_fp32=bool(_get(cfg, "optim.grad_reduce_in_fp32", True)),
        offload=not ds and bool(_get(cfg, "optim.optimizer_cpu_offload", False)),
        offload_fraction=float(_get(cfg, "optim.optimizer_offload_fraction", 1.0)),
        rollout_batch=mbs, gpu_bytes=gpu_memory_bytes(cfg, gpu_gb), z=z,
        on_gpu=on_gpu,
        fused_loss=bool(_get(cfg, "stage.fused_loss", False)),
        offload_while_sampling=not ds and stage == "opd" and (
            str(_get(cfg, "stage.offload_while_sampling", "auto")).lower() == "true"
            or (str(_get(cfg, "stage.offload_while_sampling", "auto")).lower() == "auto" and on_gpu)),
    )


# ---- the plan ----------------------------------------------------------------------------------------
def stage_params(s: Shapes, st: Settings, z: int) -> list[dict]:
    """Per pipeline stage: {"dense": n, "expert": n} parameters on one GPU of that stage."""
    per = s.layers // st.pp
    out = []
    for i in range(st.pp):
        dense = expert = 0
        for moe in s.moe_layers[i * per:(i + 1) * per]:
            p = _layer_params(s, bool(moe), z, st.tp, st.ep, st.etp)
            dense += p["dense"]
            expert += p["expert"]
        vocab_part = s.vocab // st.tp * s.hidden
        if i == 0:
            dense += vocab_part  # embedding (vocab-parallel)
        if i == st.pp - 1:
            dense += s.hidden  # final norm
            if not s.tied or st.pp > 1:
                dense += vocab_part  # output layer (a tied one is a second copy on the last stage under PP)
        out.append({"dense": dense, "expert": expert})
    return out


def _layer_activation(s: Shapes, st: Settings, moe: bool) -> int:
    """Bytes one layer keeps for its backward at one micro-batch (no recompute), bf16."""
    e = 2
    t = st.mbs * st.seq
    tsp = t // st.tp if st.sp else t
    tl = t // st.tp  # tokens x (heads / TP) regions
    n = 4 * tsp * s.hidden  # norm inputs, residuals (sequence-parallel regions)
    if s.q_lora:
        n += 2 * t * (s.q_lora + s.kv_lora + s.qk_rope)  # down projections' outputs and their norms (duplicated)
        qk = s.qk_nope + s.qk_rope
        n += tl * s.heads * (3 * qk + (s.qk_nope + s.v_head) + 2 * qk + 2 * s.v_head)  # q, k, v, up-proj outs, attn out
    else:
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        n += tl * (3 * qkv + s.heads * s.head_dim)  # qkv out, normed/roped q,k, attn out
    if moe:
        rows = tsp * s.topk * st.etp  # routed rows received by this rank (average; every slot real)
        width = s.moe_ffn // st.etp
        n += rows * (2 * s.hidden + 3 * width)  # permuted input, fc1 out, act out, fc2 out
        n += 2 * tsp * (s.experts + st.z) * 2  # router logits and probabilities (fp32)
        n += tl * 3 * s.shared_ffn
    else:
        n += tl * 3 * s.dense_ffn
    return n * e


def memory_plan(cfg, world: int | None = None, gpu_gb=None, *, on_gpu: bool | None = None) -> dict:
    """The plan as a dict (see the module docstring); ``json_line`` is its one-line JSON summary."""
    hf = hf_config_of(cfg)
    s = shapes_of(hf)
    st = settings_of(cfg, world, gpu_gb, on_gpu=on_gpu)
    counts = param_counts(hf, st.z)
    student = stage_params(s, st, st.z)
    teacher = stage_params(s, st, 0)
    worst = max(range(st.pp), key=lambda i: student[i]["dense"] + student[i]["expert"] + (st.pp - i))
    sp_, tp_ = student[worst], teacher[worst]
    n_student = sp_["dense"] + sp_["expert"]
    pb = st.param_bytes
    parts = {}
    parts["student_params"] = n_student * pb
    parts["student_grads"] = n_student * (4 if st.grad_fp32 else pb)
    per_param_opt = 8 if pb == 4 else 12
    opt_elems = (sp_["dense"] / st.dp + sp_["expert"] / st.edp) if st.dist_opt else n_student
    opt = opt_elems * per_param_opt
    host = 0.0
    if st.offload:
        host = opt * st.offload_fraction * 16 / per_param_opt  # fp32 param copy + 2 moments + pinned fp32 grad
        opt = opt * (1 - st.offload_fraction)
    host_params = 0.0
    if st.engine == "deepspeed":
        opt, host, host_params = _deepspeed_parts(parts, sp_, s, st)
    parts["optimizer_states"] = int(opt)
    parts["teacher_params"] = (tp_["dense"] + tp_["expert"]) * pb
    # activations of the training step
    per_stage_layers = s.moe_layers[worst * (s.layers // st.pp):(worst + 1) * (s.layers // st.pp)]
    layer_acts = [_layer_activation(s, st, bool(m)) for m in per_stage_layers]
    t = st.mbs * st.seq
    tsp = t // st.tp if st.sp else t
    in_flight = min(st.pp - worst, st.num_microbatches)
    if st.recompute == "full":
        kept = len(per_stage_layers) * tsp * s.hidden * 2
        acts = in_flight * kept + 2 * max(layer_acts)
    else:
        acts = in_flight * sum(layer_acts) + max(layer_acts)
    acts += max(layer_acts) + 2 * tsp * s.hidden * 2  # the teacher's forward working set, both hidden outputs
    parts["activations"] = int(acts)
    # loss: fused chunked KL on the last stage
    v_local = s.vocab // st.tp
    chunk = max(1, DEFAULT_CHUNK_ELEMENTS // v_local)
    if st.fused_loss:
        parts["loss_logits"] = LOSS_TEMPORARIES * min(chunk, t) * v_local * 4 + v_local * s.hidden * 4
    else:  # materialised: student logits (params dtype) + fp32 copies of both, log-softmax, their gradient
        parts["loss_logits"] = t * v_local * (pb + UNFUSED_LOSS_FP32_TENSORS * 4)
    # stage-2 rollout KV cache (freed before the training step)
    if st.stage == "opd":
        if s.q_lora:
            per_token_layer = s.heads // st.tp * (s.qk_nope + s.qk_rope + s.v_head) * 2
        else:
            per_token_layer = max(1, s.kv_heads // st.tp) * s.head_dim * 2 * 2
        per_sequence = st.seq * len(per_stage_layers) * per_token_layer + s.vocab * 4 * 2  # + sampling logits
        parts["rollout_kv_cache"] = int(st.rollout_batch * per_sequence)
    else:
        per_sequence = 0
        parts["rollout_kv_cache"] = 0
    gpu = st.gpu_bytes
    parts["reserve"] = int(RESERVE_FIXED + RESERVE_FRACTION * (gpu or 80 * GB))
    static = sum(parts[k] for k in ("student_params", "student_grads", "optimizer_states", "teacher_params", "reserve"))
    train_peak = parts["activations"] + parts["loss_logits"]
    # while sampling, the grad buffers and the optimizer states on the GPU are offloaded (training/rollout.offloaded)
    rollout_static = static - (parts["student_grads"] + parts["optimizer_states"] if st.offload_while_sampling else 0)
    peak = max(static + train_peak, rollout_static + parts["rollout_kv_cache"])
    fits = None if gpu is None else peak <= gpu
    # the largest decode batch (sequences of seq_length decoded together per rank) that fits while sampling
    rollout_batch_max = int((gpu - rollout_static) // per_sequence) if (gpu and per_sequence) else None
    plan = {
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
        "host_optimizer_bytes": int(host),
        "host_param_bytes": int(host_params),
        "layout": {"world": st.world, "tp": st.tp, "pp": st.pp, "ep": st.ep, "etp": st.etp, "dp": st.dp,
                   "expert_dp": st.edp, "sequence_parallel": st.sp},
        "settings": {"stage": st.stage, "tokens_per_microbatch": t, "micro_batch_size": st.mbs,
                     "seq_length": st.seq, "microbatches_in_flight": in_flight, "param_dtype":
                     "fp32" if pb == 4 else "bf16", "grad_dtype": "fp32" if st.grad_fp32 else ("fp32" if pb == 4 else "bf16"),
                     "engine": st.engine, "zero_stage": st.zero_stage, "offload_optimizer": st.ds_offload_optimizer,
                     "offload_param": st.ds_offload_param,
                     "recompute": st.recompute or "none", "distributed_optimizer": st.dist_opt,
                     "optimizer_cpu_offload": st.offload, "optimizer_offload_fraction": st.offload_fraction if st.offload else 0.0,
                     "rollout_batch": st.rollout_batch if st.stage == "opd" else 0,
                     "rollout_batch_max": rollout_batch_max if st.stage == "opd" else None,
                     "offload_while_sampling": st.offload_while_sampling, "null_experts": st.z,
                     "worst_pipeline_stage": worst},
    }
    plan["fixes"] = [] if fits in (None, True) else suggest_fixes(cfg, st, plan, world, gpu_gb, on_gpu)
    return plan


DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def _deepspeed_parts(parts: dict, sp_: dict, s: Shapes, st: Settings) -> tuple[float, float, float]:
    """engine=deepspeed (ZeRO, zeda_megatron/training/ds_engine.py): per-GPU student params/grads
    (updates ``parts``) and (optimizer GPU bytes, optimizer host bytes, param host bytes).

    ZeRO keeps an fp32 master partition (also for fp32 params) + Adam's two moments: 12 B per
    parameter of this rank's partition (dense params over DP, experts over expert-DP). ZeRO-1:
    full gradients (param dtype); ZeRO-2/3: this rank's gradient partition (fp32) plus the reduce
    bucket; ZeRO-3: this rank's parameter partition plus the largest layer gathered.
    ``offload_optimizer``: optimizer states (and the fp32 gradient partition) in host memory;
    ``offload_param`` (ZeRO-3): the parameter partition in host memory."""
    pb = st.param_bytes
    n = sp_["dense"] + sp_["expert"]
    shard = sp_["dense"] / st.dp + sp_["expert"] / st.edp
    opt = shard * 12
    if st.zero_stage >= 2:
        grads = shard * 4 + min(n, DS_REDUCE_BUCKET) * pb
    else:
        grads = n * pb
    largest_layer = max((sum(_layer_params(s, bool(m), st.z, st.tp, st.ep, st.etp).values()) for m in s.moe_layers),
                        default=0)
    params = n * pb
    host_params = 0.0
    if st.zero_stage == 3:
        params = shard * pb + largest_layer * pb
        if st.ds_offload_param:
            host_params = shard * pb
            params = largest_layer * pb
    host = 0.0
    if st.ds_offload_optimizer:
        host = opt + shard * 4  # + the fp32 gradient partition the CPU step reads
        opt = 0.0
    parts["student_params"] = int(params)
    parts["student_grads"] = int(grads)
    return opt, host, host_params


_FIX_STEPS = (
    # (setting as the user writes it, the override that applies it, applies when)
    ("stage.fused_loss=true", {"stage.fused_loss": True}, lambda st: not st.fused_loss),
    ("optim.use_distributed_optimizer=true", {"optim.use_distributed_optimizer": True},
     lambda st: st.on_gpu and not st.dist_opt),
    ("trainer.recompute=full", {"trainer.recompute": "full"}, lambda st: st.recompute != "full"),
    ("optim.optimizer_cpu_offload=true optim.optimizer_offload_fraction=1.0",
     {"optim.optimizer_cpu_offload": True, "optim.optimizer_offload_fraction": 1.0},
     lambda st: st.on_gpu and (not st.offload or st.offload_fraction < 1.0)),
    ("optim.grad_reduce_in_fp32=false", {"optim.grad_reduce_in_fp32": False},
     lambda st: st.grad_fp32 and st.param_bytes == 2),
)


def _with(cfg, overrides: dict):
    from omegaconf import OmegaConf, open_dict

    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)) if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    with open_dict(new):
        for k, v in overrides.items():
            OmegaConf.update(new, k, v, force_add=True)
    return new


_DS_FIX_STEPS = (  # engine=deepspeed: ZeRO's memory settings instead of megatron's
    ("stage.fused_loss=true", {"stage.fused_loss": True}, lambda st: not st.fused_loss),
    ("trainer.recompute=full", {"trainer.recompute": "full"}, lambda st: st.recompute != "full"),
    ("engine.zero_stage=3", {"engine.zero_stage": 3}, lambda st: st.zero_stage < 3 and st.ep == 1),
    ("engine.offload_optimizer=true", {"engine.offload_optimizer": True}, lambda st: not st.ds_offload_optimizer),
    ("engine.offload_param=true", {"engine.offload_param": True},
     lambda st: st.ep == 1 and not st.ds_offload_param),
)


def suggest_fixes(cfg, st: Settings, plan: dict, world, gpu_gb, on_gpu) -> list[str]:
    """The memory settings that make the layout fit, cumulatively in this order (cheapest first),
    then what still would (more GPUs / EP, shorter sequences)."""
    applied, over = [], {}
    for text, o, when in (_DS_FIX_STEPS if st.engine == "deepspeed" else _FIX_STEPS):
        if not when(st):
            continue
        over.update(o)
        applied.append(text)
        p = memory_plan(_with(cfg, over), world, gpu_gb, on_gpu=on_gpu)
        if p["fits"]:
            return applied
    more = []
    if st.stage == "opd" and plan["per_gpu_bytes"]["rollout_kv_cache"] > plan["per_gpu_bytes"]["activations"]:
        more.append("a smaller trainer.micro_batch_size (sequences decoded together) or stage.max_new_tokens")
    parts = plan["per_gpu_bytes"]
    if parts["activations"] + parts["loss_logits"] > 0.1 * plan["gpu_bytes"]:
        more.append(f"trainer.seq_length below {st.seq} or trainer.micro_batch_size below {st.mbs}" if st.mbs > 1
                    else f"trainer.seq_length below {st.seq}")
    more.append("more GPUs (a larger parallel.ep / parallel.tp / parallel.pp, e.g. parallel=reference_8gpu)")
    return applied + ["and still: " + "; ".join(more)]


# ---- presentation ------------------------------------------------------------------------------------
ROWS = (
    ("student_params", "student parameters"),
    ("student_grads", "student gradients (DDP buffer)"),
    ("optimizer_states", "optimizer states (on GPU)"),
    ("teacher_params", "teacher parameters (frozen)"),
    ("activations", "activations (training step)"),
    ("loss_logits", "loss-time logits (chunked KL, or materialised without stage.fused_loss)"),
    ("rollout_kv_cache", "rollout KV cache (stage 2)"),
    ("reserve", "reserve (CUDA/NCCL/fragmentation)"),
)


def gib(n) -> str:
    return f"{n / GiB:8.2f}"


def format_table(plan: dict, model_name: str = "") -> str:
    lay, se = plan["layout"], plan["settings"]
    lines = [
        f"memory plan: {model_name} stage={se['stage']} world={lay['world']} tp={lay['tp']} pp={lay['pp']} "
        f"ep={lay['ep']} etp={lay['etp']} dp={lay['dp']} (expert dp {lay['expert_dp']}) sp={lay['sequence_parallel']}",
        f"  params: original {plan['total_params']:,}, student {plan['student_params']:,} "
        f"(+{plan['null_router_rows']:,} null router rows); per GPU {plan['per_gpu_params']['student']:,} student, "
        f"{plan['per_gpu_params']['teacher']:,} teacher",
        f"  {se['tokens_per_microbatch']:,} tokens/micro-batch ({se['micro_batch_size']} x {se['seq_length']}), "
        f"{se['microbatches_in_flight']} in flight; params {se['param_dtype']}, grads {se['grad_dtype']}, "
        f"recompute {se['recompute']}, distributed optimizer {se['distributed_optimizer']}, "
        f"CPU offload {se['optimizer_offload_fraction'] if se['optimizer_cpu_offload'] else 'off'}"
        + (f"; engine=deepspeed ZeRO-{se['zero_stage']}, offload optimizer {se['offload_optimizer']}, "
           f"params {se['offload_param']}" if se.get("engine") == "deepspeed" else "")
        + (f", rollout batch {se['rollout_batch']} (at most {se['rollout_batch_max']} fit"
           + (", grads and optimizer offloaded while sampling)" if se.get("offload_while_sampling") else ")")
           if se["stage"] == "opd" else ""),
        "",
        "| part | GiB per GPU |",
        "|---|---:|",
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | {gib(plan['per_gpu_bytes'][key]).strip()} |")
    lines.append(f"| **peak (max of the training step and the rollout)** | **{gib(plan['gpu_bytes']).strip()}** |")
    if plan["gpu_capacity_bytes"]:
        lines.append(f"| GPU ({plan['gpu_capacity_bytes'] / GB:.0f} GB) | {gib(plan['gpu_capacity_bytes']).strip()} |")
        lines.append(f"| headroom | {gib(plan['headroom_bytes']).strip()} |")
    if plan["host_optimizer_bytes"]:
        lines.append(f"| (host memory: offloaded optimizer, per GPU) | {gib(plan['host_optimizer_bytes']).strip()} |")
    if plan.get("host_param_bytes"):
        lines.append(f"| (host memory: offloaded parameters, per GPU) | {gib(plan['host_param_bytes']).strip()} |")
    lines.append("")
    if plan["fits"] is None:
        lines.append("fits: not checked (no GPU size: gpu_gb=...)")
    elif plan["fits"]:
        lines.append(f"fits: yes, {plan['headroom_bytes'] / GiB:.1f} GiB headroom")
    else:
        lines.append(f"fits: NO, {-plan['headroom_bytes'] / GiB:.1f} GiB over; to fit: " + "; ".join(plan["fixes"]))
    return "\n".join(lines)


def json_line(plan: dict) -> str:
    keys = ("total_params", "student_params", "per_gpu_bytes", "gpu_bytes", "fits", "gpu_capacity_bytes",
            "host_optimizer_bytes", "host_param_bytes", "layout", "settings")
    return json.dumps({k: plan[k] for k in keys}, sort_keys=False)


# ---- the trainer's check -----------------------------------------------------------------------------
def check_fits(cfg, world_size: int, *, gpu_gb=None, error=PlanError) -> dict | None:
    """Raise ``error`` naming the settings that would make it fit when the run's plan exceeds the GPU
    (``parallel.gpu_memory_gb``: auto = this machine's GPU, nothing to check on CPU; a number in GB;
    null = off). Returns the plan (None when not checked)."""
    if gpu_memory_bytes(cfg, gpu_gb) is None:
        return None
    try:
        plan = memory_plan(cfg, world_size, gpu_gb)
    except PlanError as e:
        raise error(str(e)) from e
    if plan["fits"] is False:
        gpu = plan["gpu_capacity_bytes"]
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in plan["per_gpu_bytes"].items() if v)
        raise error(
            f"parallel: the layout does not fit: the memory plan needs {plan['gpu_bytes'] / GiB:.1f} GiB per GPU "
            f"({parts} GiB) on a {gpu / GB:.0f} GB GPU (parallel.gpu_memory_gb). To fit: " + "; ".join(plan["fixes"])
            + ". See `python -m zeda_megatron.plan` with the same overrides; parallel.gpu_memory_gb=null skips this check."
        )
    return plan


def check_config(cfg, world_size: int, *, error=PlanError) -> None:
    """The plan's part of the trainer's config validation (before any weight is read): the
    ``model.mcore`` settings, then the memory plan. Raises ``error`` naming the key."""
    from zeda_megatron.bridge.hf_config import BridgeError, check_mcore_settings, model_info

    try:
        info = model_info(hf_config_of(cfg))
        mcore = check_mcore_settings(_get(cfg, "model.mcore"), family=info.family)
    except (BridgeError, PlanError) as e:
        raise error(str(e)) from e
    if mcore:
        _check_transformer_config(cfg, info, mcore, error)
    _check_optimizer_memory_settings(cfg, error)
    check_fits(cfg, world_size, error=error)


def _check_optimizer_memory_settings(cfg, error) -> None:
    frac = _get(cfg, "optim.optimizer_offload_fraction", 1.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= float(frac) <= 1.0:
        raise error(f"optim.optimizer_offload_fraction={frac!r} must be a number in [0, 1]")
    grad = _get(cfg, "optim.grad_reduce_in_fp32", True)
    if not isinstance(grad, bool):
        raise error(f"optim.grad_reduce_in_fp32={grad!r} must be true or false")
    if not _get(cfg, "optim.optimizer_cpu_offload", False):
        return
    # (on CPU the trainer refuses the distributed optimizer, which offload needs, before reading weights;
    # validating a GPU preset on a CPU machine stays possible)
    if _get(cfg, "optim.use_distributed_optimizer", "auto") is False:
        raise error("optim.optimizer_cpu_offload=true needs the distributed optimizer (megatron-core runs the "
                    "offloaded step through its precision-aware path): set optim.use_distributed_optimizer=true/auto")


def _check_transformer_config(cfg, info, mcore: dict, error) -> None:
    """Build (only) the TransformerConfig with the user's model.mcore settings and the layout, so that
    megatron-core's own consistency checks fail now, not after the weights are loaded."""
    import torch

    from zeda_megatron.bridge.hf_config import transformer_config
    from zeda_megatron.platform import on_cpu

    tp, pp, ep = (int(_get(cfg, f"parallel.{k}", 1)) for k in ("tp", "pp", "ep"))
    precision = str(_get(cfg, "trainer.precision", "auto"))
    dtype = torch.float32 if precision == "fp32" or (precision == "auto" and on_cpu()) else torch.bfloat16
    try:
        transformer_config(
            info, params_dtype=dtype, mcore=mcore, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=int(_get(cfg, "parallel.etp") or tp),
            sequence_parallel=bool(_get(cfg, "parallel.sequence_parallel", False)),
            pipeline_dtype=dtype if pp > 1 else None,
        )
    except (ValueError, AssertionError, TypeError) as e:
        raise error(f"model.mcore: megatron-core rejects these settings: {e}") from e


# ---- command line ------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    gpu_gb, world, overrides = None, None, []
    for a in argv:
        if a.startswith("gpu_gb="):
            gpu_gb = float(a.split("=", 1)[1])
        elif a.startswith("world="):
            world = int(a.split("=", 1)[1])
        else:
            overrides.append(a)
    cfg = compose(overrides)
    if gpu_gb is None and gpu_memory_bytes(cfg) is None:
        gpu_gb = 80.0
    try:
        # the plan is for the GPU run the config describes, also when printed on a CPU machine
        plan = memory_plan(cfg, world, gpu_gb, on_gpu=True)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(plan, str(_get(cfg, "model.name", ""))))
    print(json_line(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
