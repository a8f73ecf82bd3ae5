"""The parallel layout's rules, checked in one place.

:func:`check_layout` is what the config validation (before any process exists), the model builder
(bridge/builders.py) and :func:`zeda_megatron.distributed.init_parallel` all call; each passes what
it knows (a world size, a model's HF config) and gets a :class:`LayoutError` naming the config key,
the megatron-core setting and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping


class LayoutError(ValueError):
    """A TP/PP/EP/ETP/SP layout that cannot run; the message names the setting and the fix."""


def num_experts_of(hf: Mapping) -> int | None:
    """Routed experts of an HF config dict (num_experts / n_routed_experts / num_local_experts)."""
    for key in ("num_experts", "n_routed_experts", "num_local_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    return None


def check_layout(*, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                 sequence_parallel: bool = False, world_size: int | None = None,
                 hf_config: Mapping | None = None, training: bool = True) -> None:
    """Raise :class:`LayoutError` for a layout that cannot run.

    ``world_size``: checks that tp*pp and etp*ep*pp divide it (skipped when None). ``hf_config``:
    checks the model splits that way (experts by ep, layers by pp, heads/kv heads/vocab by tp).
    ``training``: MoE + TP needs sequence parallelism (megatron-core refuses it otherwise).
    """
    etp = tp if etp is None else etp
    for key, name, size in (("parallel.tp", "tensor_model_parallel_size", tp),
                            ("parallel.pp", "pipeline_model_parallel_size", pp),
                            ("parallel.ep", "expert_model_parallel_size", ep),
                            ("parallel.etp", "expert_tensor_parallel_size", etp)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise LayoutError(f"{key}: {name}={size!r} must be an integer >= 1")
    if world_size is not None:
        if world_size % (tp * pp):
            raise LayoutError(
                f"parallel.tp*parallel.pp = {tp}*{pp} = {tp * pp} does not divide the world size {world_size}; "
                "change tp/pp or the number of processes"
            )
        if world_size % (etp * ep * pp):
            raise LayoutError(
                f"parallel.ep={ep} does not fit the world (expert_model_parallel_size): etp*ep*pp = "
                f"{etp}*{ep}*{pp} must divide the world size {world_size} (with etp=tp: ep must divide "
                f"world/(tp*pp) = {world_size // (tp * pp) if world_size % (tp * pp) == 0 else '?'}); "
                "change ep or the process count"
            )
    if training and tp > 1 and not sequence_parallel:
        raise LayoutError(
            f"parallel.tp={tp} with an MoE model needs parallel.sequence_parallel=true (megatron-core refuses "
            "MoE + TP training without it)"
        )
    if hf_config is None:
        return
    n_exp = num_experts_of(hf_config)
    if n_exp is not None and n_exp % ep:
        raise LayoutError(
            f"parallel.ep={ep} does not divide the number of experts E={n_exp} (expert_model_parallel_size={ep} vs "
            f"num_experts/n_routed_experts={n_exp}); choose an ep that divides it"
        )
    layers = hf_config.get("num_hidden_layers")
    if layers is not None and int(layers) % pp:
        raise LayoutError(
            f"parallel.pp={pp} does not divide model.hf_config.num_hidden_layers={layers} "
            f"(pipeline_model_parallel_size={pp}); choose a pp dividing it"
        )
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        if hf_config.get(key) is not None and int(hf_config[key]) % tp:
            raise LayoutError(
                f"parallel.tp={tp} does not divide model.hf_config.{key}={hf_config[key]} "
                f"(tensor_model_parallel_size={tp}); choose a tp dividing it"
            )


ENGINES = ("megatron", "deepspeed")


def check_engine(*, engine: str = "megatron", zero_stage: int | None = None, offload_optimizer: bool = False,
                 offload_param: bool = False, tp: int = 1, pp: int = 1, ep: int = 1,
                 sequence_parallel: bool = False) -> None:
    """Raise :class:`LayoutError` for a training engine / layout pair that cannot run.

    ``engine=deepspeed`` (zeda_megatron/training/ds_engine.py) wraps the megatron-core student in a
    DeepSpeed engine: no pipeline stages (DeepSpeed's pipeline engine needs its own PipelineModule),
    no tensor parallelism (megatron's finalize_model_grads reduces the sequence-parallel norm
    weights over TP; ZeRO does not), ZeRO stage 1, 2 or 3, ZeRO-3 without expert parallelism
    (ZeRO-3 would partition each rank's own experts as if they were replicas), parameter offload
    only with ZeRO-3 (DeepSpeed's rule)."""
    if engine not in ENGINES:
        raise LayoutError(f"engine={engine!r} is unknown; use engine=megatron or engine=deepspeed")
    if engine != "deepspeed":
        return
    if zero_stage not in (1, 2, 3) or isinstance(zero_stage, bool):
        raise LayoutError(f"engine.zero_stage={zero_stage!r} must be 1, 2 or 3 under engine=deepspeed")
    if pp > 1:
        raise LayoutError(
            f"parallel.pp={pp} with engine=deepspeed: the DeepSpeed engine runs the megatron-core student "
            "without pipeline stages (pipeline_model_parallel_size must be 1); use parallel.pp=1 or engine=megatron")
    if tp > 1 or sequence_parallel:
        raise LayoutError(
            f"parallel.tp={tp} (sequence_parallel={sequence_parallel}) with engine=deepspeed: megatron-core's "
            "TP reductions of the sequence-parallel weights live in its finalize_model_grads, which ZeRO does "
            "not run; use parallel.tp=1 or engine=megatron")
    if zero_stage == 3 and ep > 1:
        raise LayoutError(
            f"engine.zero_stage=3 with parallel.ep={ep}: ZeRO-3 partitions each rank's parameters over the "
            "data-parallel group, but expert-parallel ranks hold different experts; use engine.zero_stage=1/2 "
            "with expert parallelism, or parallel.ep=1 with ZeRO-3")
    if offload_param and zero_stage != 3:
        raise LayoutError(
            "engine.offload_param=true needs engine.zero_stage=3 (DeepSpeed offloads parameters only "
            f"under ZeRO-3; zero_stage={zero_stage})")
