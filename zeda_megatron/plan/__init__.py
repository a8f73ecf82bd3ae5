"""The memory plan of a run, from its resolved :class:`~zeda_megatron.spec.RunSpec` alone (no weights,
no GPU, no processes): ``shapes`` (parameter counts from the HF config), ``memory`` (bytes per GPU by
part), ``fixes`` (what makes a layout fit; the trainer's refusal), ``report`` (table and JSON line);
``python -m zeda_megatron.plan`` prints it."""

from zeda_megatron.plan.fixes import check_fits, plan_with_fixes, suggest_fixes
from zeda_megatron.plan.memory import GiB, PlanError, memory_plan
from zeda_megatron.plan.report import format_table, json_line
from zeda_megatron.plan.shapes import Shapes, layer_params, param_counts, shapes_of, stage_params

__all__ = ["GiB", "PlanError", "Shapes", "check_fits", "format_table", "json_line", "layer_params", "memory_plan",
           "param_counts", "plan_with_fixes", "shapes_of", "stage_params", "suggest_fixes"]
