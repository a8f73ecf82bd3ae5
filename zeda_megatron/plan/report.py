"""The memory plan as text: the table ``python -m zeda_megatron.plan`` prints, and its one JSON line."""

from __future__ import annotations

import json

from zeda_megatron.plan.memory import GiB
from zeda_megatron.spec.types import GB

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
JSON_KEYS = ("total_params", "student_params", "per_gpu_bytes", "gpu_bytes", "fits", "gpu_capacity_bytes",
             "host_optimizer_bytes", "host_param_bytes", "layout", "settings")


def gib(n) -> str:
    return f"{n / GiB:.2f}"


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
        lines.append(f"| {label} | {gib(plan['per_gpu_bytes'][key])} |")
    lines.append(f"| **peak (max of the training step and the rollout)** | **{gib(plan['gpu_bytes'])}** |")
    if plan["gpu_capacity_bytes"]:
        lines.append(f"| GPU ({plan['gpu_capacity_bytes'] / GB:.0f} GB) | {gib(plan['gpu_capacity_bytes'])} |")
        lines.append(f"| headroom | {gib(plan['headroom_bytes'])} |")
    if plan["host_optimizer_bytes"]:
        lines.append(f"| (host memory: offloaded optimizer, per GPU) | {gib(plan['host_optimizer_bytes'])} |")
    if plan.get("host_param_bytes"):
        lines.append(f"| (host memory: offloaded parameters, per GPU) | {gib(plan['host_param_bytes'])} |")
    lines.append("")
    if plan["fits"] is None:
        lines.append("fits: not checked (no GPU size: gpu_gb=...)")
    elif plan["fits"]:
        lines.append(f"fits: yes, {plan['headroom_bytes'] / GiB:.1f} GiB headroom")
    else:
        lines.append(f"fits: NO, {-plan['headroom_bytes'] / GiB:.1f} GiB over; to fit: " + "; ".join(plan["fixes"]))
    return "\n".join(lines)


def json_line(plan: dict) -> str:
    return json.dumps({k: plan[k] for k in JSON_KEYS}, sort_keys=False)
