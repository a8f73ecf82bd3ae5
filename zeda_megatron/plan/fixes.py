"""What makes a layout fit: the memory settings to turn on, cheapest first, and the trainer's refusal of
a run that does not fit (before any weight is read)."""

from __future__ import annotations

from zeda_megatron.plan.memory import GiB, PlanError, memory_plan
from zeda_megatron.spec import RunSpec
from zeda_megatron.spec.types import GB

# (setting as the user writes it, the spec fields it changes, applies when)
FIX_STEPS = (
    ("stage.fused_loss=true", {"stage.fused_loss": True}, lambda s: not s.stage.fused_loss),
    ("optim.use_distributed_optimizer=true", {"optim.distributed_optimizer": True},
     lambda s: s.on_gpu and not s.optim.distributed_optimizer),
    ("trainer.recompute=full", {"trainer.recompute": "full"}, lambda s: s.trainer.recompute != "full"),
    ("optim.optimizer_cpu_offload=true optim.optimizer_offload_fraction=1.0",
     {"optim.cpu_offload": True, "optim.offload_fraction": 1.0, "optim.distributed_optimizer": True},
     lambda s: s.on_gpu and (not s.optim.cpu_offload or s.optim.offload_fraction < 1.0)),
    ("optim.grad_reduce_in_fp32=false", {"optim.grad_reduce_in_fp32": False},
     lambda s: s.optim.grad_reduce_in_fp32 and s.trainer.param_bytes == 2),
)
DS_FIX_STEPS = (  # engine=deepspeed: ZeRO's memory settings instead of megatron's
    ("stage.fused_loss=true", {"stage.fused_loss": True}, lambda s: not s.stage.fused_loss),
    ("trainer.recompute=full", {"trainer.recompute": "full"}, lambda s: s.trainer.recompute != "full"),
    ("engine.zero_stage=3", {"engine.zero_stage": 3}, lambda s: s.engine.zero_stage < 3 and s.layout.ep == 1),
    ("engine.offload_optimizer=true", {"engine.offload_optimizer": True}, lambda s: not s.engine.offload_optimizer),
    ("engine.offload_param=true", {"engine.offload_param": True},
     lambda s: s.layout.ep == 1 and not s.engine.offload_param),
)


def suggest_fixes(spec: RunSpec, plan: dict) -> list[str]:
    """The memory settings that make the layout fit, cumulatively in this order (cheapest first),
    then what still would (more GPUs / EP, shorter sequences)."""
    applied, changes = [], {}
    current = spec
    for text, change, when in (DS_FIX_STEPS if spec.engine.deepspeed else FIX_STEPS):
        if not when(current):
            continue
        changes.update(change)
        applied.append(text)
        current = spec.with_(**changes)
        if memory_plan(current)["fits"]:
            return applied
    more = []
    parts = plan["per_gpu_bytes"]
    if spec.stage.needs_sampling and parts["rollout_kv_cache"] > parts["activations"]:
        more.append("a smaller trainer.micro_batch_size (sequences decoded together) or stage.max_new_tokens")
    if parts["activations"] + parts["loss_logits"] > 0.1 * plan["gpu_bytes"]:
        tr = spec.trainer
        more.append(f"trainer.seq_length below {tr.seq_length} or trainer.micro_batch_size below {tr.micro_batch_size}"
                    if tr.micro_batch_size > 1 else f"trainer.seq_length below {tr.seq_length}")
    more.append("more GPUs (a larger parallel.ep / parallel.tp / parallel.pp, e.g. parallel=reference_8gpu)")
    return applied + ["and still: " + "; ".join(more)]


def plan_with_fixes(spec: RunSpec) -> dict:
    """:func:`memory_plan`, with ``fixes`` filled in when the layout does not fit."""
    plan = memory_plan(spec)
    if plan["fits"] is False:
        plan["fixes"] = suggest_fixes(spec, plan)
    return plan


def check_fits(spec: RunSpec, error=PlanError) -> dict | None:
    """Raise ``error`` naming the settings that would make it fit when the run's plan exceeds the GPU
    (``parallel.gpu_memory_gb``: auto = this machine's GPU, nothing to check on CPU; a number in GB;
    null = off). Returns the plan (None when not checked)."""
    if spec.layout.gpu_memory_bytes is None:
        return None
    plan = plan_with_fixes(spec)
    if plan["fits"] is False:
        gpu = plan["gpu_capacity_bytes"]
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in plan["per_gpu_bytes"].items() if v)
        raise error(
            f"parallel: the layout does not fit: the memory plan needs {plan['gpu_bytes'] / GiB:.1f} GiB per GPU "
            f"({parts} GiB) on a {gpu / GB:.0f} GB GPU (parallel.gpu_memory_gb). To fit: " + "; ".join(plan["fixes"])
            + ". See `python -m zeda_megatron.plan` with the same overrides; parallel.gpu_memory_gb=null skips this check."
        )
    return plan
