"""The training engine: one interface (:class:`Engine`), two implementations, one builder.

The trainer, the checkpoint code and the stages use only what :class:`Engine` declares:

* ``start_step(microbatches)`` / ``finish_step() -> (ok, grad_norm)`` around megatron-core's
  forward/backward schedule (:func:`zeda_megatron.training.step.train_step`), which runs the backward;
* ``current_lr()``;
* ``save_state(path)`` / ``load_state(path)``: the student's weights and the optimizer state in one
  iteration folder (the folder layout, the scheduler and the step are :mod:`.checkpoint`'s);
* ``offloaded_for_sampling(enabled)``: a context during which the training memory may leave the device
  (stage 2 samples inside it);
* ``optimizer_state_bytes(masters)``: what the optimizer state holds, by device;
* the parts every step reads: ``wrapper`` (the co-located student and teacher), ``student``,
  ``teacher``, ``config`` (the student's TransformerConfig), ``info``, ``null``, ``loss_spec``,
  ``scheduler``, and ``kind`` (recorded in checkpoints: a checkpoint resumes only under its engine).

:class:`MegatronEngine` (``engine=megatron``): megatron-core's DistributedDataParallel and optimizer
(:mod:`.build`). :class:`DeepSpeedTrainEngine` (``engine=deepspeed``): the same student wrapped by a
DeepSpeed ZeRO engine (:mod:`.ds_engine`). Both share the models, the LR schedule
(:func:`.build.build_scheduler`) and megatron-core's schedule; :func:`build_engine` picks one from the
run's spec. Call after :func:`zeda_megatron.distributed.init_parallel`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os

import torch
import torch.distributed as dist

from zeda_megatron.distributed import comm_device
from zeda_megatron.spec import RunSpec
from zeda_megatron.training.distill import CoLocatedDistillation


class Engine(abc.ABC):
    """What the trainer steps: the co-located pair, the LR scheduler and the student's settings, with
    the engine-specific operations as methods (see the module doc)."""

    kind: str  # "megatron" | "deepspeed"

    def __init__(self, wrapper: CoLocatedDistillation, scheduler, config, info, null, loss_spec):
        self.wrapper = wrapper
        self.scheduler = scheduler
        self.config = config
        self.info = info
        self.null = null
        self.loss_spec = loss_spec

    @property
    def student(self):
        return self.wrapper.student

    @property
    def teacher(self):
        return self.wrapper.teacher

    @abc.abstractmethod
    def start_step(self, microbatches: list[dict]) -> None:
        """Before the forward/backward: zero the gradients (and whatever the engine scales by)."""

    @abc.abstractmethod
    def finish_step(self) -> tuple[bool, float]:
        """After the backward: the optimizer step (clipping included) and the LR schedule; (ok, grad_norm)."""

    @abc.abstractmethod
    def current_lr(self) -> float:
        """The learning rate of the step that just ran."""

    @abc.abstractmethod
    def save_state(self, path: str) -> None:
        """Write the student's weights and the optimizer state into the iteration folder ``path``
        (all ranks call; the folder exists)."""

    @abc.abstractmethod
    def load_state(self, path: str) -> None:
        """Restore what :meth:`save_state` wrote into ``path``."""

    @abc.abstractmethod
    def offloaded_for_sampling(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """A context in which sampling may use the memory of the grad buffers and optimizer state.
        Enter it between steps (after ``finish_step``, before the next ``start_step``)."""

    @abc.abstractmethod
    def optimizer_state_bytes(self, masters: bool = True) -> dict:
        """{device type: bytes} of this rank's optimizer state (with ``masters``, fp32 master copies kept
        apart from the model included)."""


class MegatronEngine(Engine):
    """``engine=megatron``: megatron-core's DistributedDataParallel and optimizer (the distributed
    optimizer where the platform allows it), checkpoints in megatron-core's dist_checkpointing format
    (they load under any TP x EP x PP layout)."""

    kind = "megatron"

    def __init__(self, wrapper, ddp, optimizer, scheduler, config, info, null, loss_spec):
        super().__init__(wrapper, scheduler, config, info, null, loss_spec)
        self.ddp = ddp
        self.optimizer = optimizer

    @classmethod
    def build(cls, spec: RunSpec, hf_dir: str | None) -> MegatronEngine:
        """Teacher and student (HF weights, null rows drawn with ``spec.seed``), the student's DDP
        wrapper, optimizer and scheduler."""
        from zeda_megatron.training.build import (
            build_models, build_optimizer, check_distributed_optimizer, loss_spec, null_settings,
        )

        check_distributed_optimizer(spec.optim)  # before any weight is read
        teacher, student, config, info = build_models(spec, hf_dir)
        ddp, optimizer, scheduler = build_optimizer(student, config, spec)
        return cls(CoLocatedDistillation(ddp, teacher), ddp, optimizer, scheduler, config, info,
                   null_settings(spec), loss_spec(spec))

    def start_step(self, microbatches: list[dict]) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finish_step(self):
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return ok, grad_norm

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _sharded_state(self, is_loading: bool) -> dict:
        model_sd = self.student.sharded_state_dict()
        return {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}

    def save_state(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(self._sharded_state(is_loading=False), path)

    def load_state(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load(self._sharded_state(is_loading=True), path)
        self.student.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])

    def offloaded_for_sampling(self, enabled: bool = True):
        from zeda_megatron.training.offload import offloaded

        return offloaded(self.ddp, self.optimizer, enabled=enabled)

    def optimizer_state_bytes(self, masters: bool = True) -> dict:
        return optimizer_state_bytes(self.optimizer, masters)


class DeepSpeedTrainEngine(Engine):
    """``engine=deepspeed``: the student's step runs through a DeepSpeed ZeRO engine (``self.ds``).

    The backward still runs in megatron-core's schedule: DeepSpeed's forward registers its backward
    hooks on the student's output, so ``torch.autograd.backward`` there is a DeepSpeed backward.
    megatron scales gradients by the global token count (``calculate_per_token_loss``); DeepSpeed
    averages over the DP group. :meth:`start_step` therefore sets ``loss_scale = dp / tokens`` (the
    step's loss-mask sum over DP, known before the forward), which the schedule applies to the loss
    and the MoE aux loss through ``config.grad_scale_func``; the gradients then equal megatron's."""

    kind = "deepspeed"

    def __init__(self, wrapper, ds, scheduler, config, info, null, loss_spec, *, zero_stage: int, ep: int):
        super().__init__(wrapper, scheduler, config, info, null, loss_spec)
        self.ds = ds
        self.zero_stage = zero_stage
        self.ep = ep
        self.loss_scale = 1.0
        # the hooks megatron-core's schedule calls: micro-batch boundaries, after-backward work, loss scale
        config.no_sync_func = self._no_sync
        config.finalize_model_grads_func = self._finalize
        config.grad_scale_func = lambda loss: loss * self.loss_scale

    @classmethod
    def build(cls, spec: RunSpec, hf_dir: str) -> DeepSpeedTrainEngine:
        """Teacher and student as :meth:`MegatronEngine.build`, the student wrapped by DeepSpeed
        (``spec.engine``: conf/engine/deepspeed.yaml). PP=1."""
        from zeda_megatron.training.build import build_models, loss_spec, null_settings
        from zeda_megatron.training.ds_engine import init_deepspeed_comm, wrap_student

        init_deepspeed_comm()
        teacher, student, config, info = build_models(spec, hf_dir)
        ds, scheduler, zero_stage, ep = wrap_student(student, spec)
        return cls(CoLocatedDistillation(ds, teacher), ds, scheduler, config, info, null_settings(spec),
                   loss_spec(spec), zero_stage=zero_stage, ep=ep)

    # -- the step -------------------------------------------------------------------------------
    def start_step(self, microbatches: list[dict]) -> None:
        from megatron.core import parallel_state as ps

        self.ds.zero_grad()
        tokens = torch.zeros(1, dtype=torch.float64, device=comm_device())
        for mb in microbatches:
            tokens += mb["loss_mask"].detach().double().sum().to(tokens.device)
        dist.all_reduce(tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
        self.loss_scale = ps.get_data_parallel_world_size() / max(float(tokens), 1.0)

    def finish_step(self):
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        self.scheduler.step(increment=1)
        return bool(torch.isfinite(torch.tensor(norm))), norm

    def current_lr(self) -> float:
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def _no_sync(self):
        """megatron's no_sync: no gradient reduction until the last micro-batch's backward."""
        ds = self.ds

        @contextlib.contextmanager
        def ctx():
            ds.set_gradient_accumulation_boundary(False)
            try:
                yield
            finally:
                ds.set_gradient_accumulation_boundary(True)

        return ctx()

    def _finalize(self, model, num_tokens=None, **kw):
        """What megatron's finalize_model_grads does beyond DP reduction and token scaling (both
        DeepSpeed's / the loss scale's here): the expert-bias update."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        cfg = self.config
        routers = [] if not getattr(cfg, "moe_router_enable_expert_bias", False) else \
            [m for m in self.student.modules() if getattr(m, "expert_bias", None) is not None
             and m.training and not getattr(m, "frozen_expert_bias", False)]
        if routers:
            new = get_updated_expert_bias(
                torch.stack([r.local_tokens_per_expert for r in routers]),
                torch.stack([r.expert_bias for r in routers]), cfg.moe_router_bias_update_rate,
                tp_dp_cp_group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
            for r, b in zip(routers, new):
                r.expert_bias.copy_(b)
        reset_model_temporary_tensors(cfg, [self.student])

    # -- checkpoints ------------------------------------------------------------------------------
    def save_state(self, path: str) -> None:
        """DeepSpeed's save_checkpoint into ``path/ds`` (module, ZeRO partitions of the optimizer)
        and this expert-parallel rank's student weights (``student_ep###.pt``, gathered under
        ZeRO-3) for export / ``model.init_checkpoint``."""
        from megatron.core import parallel_state as ps

        from zeda_megatron.bridge.ds_weights import DS_LAYOUT, DS_TAG, WEIGHTS

        dist.barrier()  # the folder exists on every rank
        self.ds.save_checkpoint(path, tag=DS_TAG, save_latest=False)
        state = self.full_student_state()
        if ps.get_expert_data_parallel_rank() == 0:
            ep_rank = ps.get_expert_model_parallel_rank()
            torch.save(state, os.path.join(path, WEIGHTS.format(ep=ep_rank)))
            if dist.get_rank() == 0:
                with open(os.path.join(path, DS_LAYOUT), "w") as f:
                    json.dump({"ep": self.ep, "zero_stage": self.zero_stage}, f)
        dist.barrier()

    def load_state(self, path: str) -> None:
        from zeda_megatron.bridge.ds_weights import DS_TAG, load_student_weights

        load_path, _ = self.ds.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=False)
        if load_path is None:
            raise FileNotFoundError(f"{path!r}: DeepSpeed checkpoint tag {DS_TAG!r} not found")
        if self.zero_stage < 3:  # module states hold one EP rank's experts: restore this rank's
            load_student_weights(self.student, path)

    def full_student_state(self) -> dict:
        """The student's full state dict on the host (parameters gathered under ZeRO-3)."""
        def host_copy():
            return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items() if torch.is_tensor(v)}

        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None):
                return host_copy()
        return host_copy()

    # -- memory -----------------------------------------------------------------------------------
    def offloaded_for_sampling(self, enabled: bool = True):
        """Nothing moves: DeepSpeed places its partitions itself (engine.offload_optimizer /
        offload_param), so ``stage.offload_while_sampling`` resolves to false under this engine."""
        return contextlib.nullcontext()

    def optimizer_state_bytes(self, masters: bool = True) -> dict:
        return optimizer_state_bytes(self.ds.optimizer, masters)


def optimizer_state_bytes(optimizer, masters: bool = True) -> dict:
    """{device type: bytes} of the tensors in an optimizer's state (Adam's moments and step
    counters) and, with ``masters``, a DeepSpeed ZeRO optimizer's fp32 master partitions, measured
    from the tensors."""
    out: dict = {}
    seen = set()

    def add(t):
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()

    chained = getattr(optimizer, "chained_optimizers", None)  # megatron: dense + expert optimizers
    for opts in (chained if chained else [optimizer]):
        while not isinstance(opts, torch.optim.Optimizer) and hasattr(opts, "optimizer"):
            opts = opts.optimizer  # megatron's / DeepSpeed's wrapper -> the torch optimizer
        for st in opts.state.values():
            for v in st.values():
                add(v)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat") if masters else ():
        for t in getattr(optimizer, name, None) or []:
            add(t)
    return out


def build_engine(spec: RunSpec, hf_dir: str | None = None) -> Engine:
    """The engine ``spec.engine`` names for this rank: teacher + student (weights from ``hf_dir``,
    default ``spec.model.hf_dir``; none for a shapes-only spec), the student's wrapper, optimizer and
    LR schedule."""
    hf_dir = hf_dir or spec.model.hf_dir
    if not hf_dir and spec.model.source != "shapes":
        raise ValueError("build_engine needs the original model's HF folder (model.hf_dir, or hf_dir=...)")
    cls = DeepSpeedTrainEngine if spec.engine.deepspeed else MegatronEngine
    return cls.build(spec, hf_dir)
