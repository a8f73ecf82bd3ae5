"""Training memory off the device while stage 2 samples: the DDP grad buffers and the optimizer state.

:func:`offload_training_state` / :func:`restore_training_state` (or the :func:`offloaded` context)
free the DDP grad buffers (megatron-core's ``offload_grad_buffers``) and the optimizer state
(megatron-core's ``offload_to_cpu``/``restore_from_cpu`` on GPU for optimizers with their own fp32
main params; a storage-level copy of the Adam state otherwise), so that sampling can use that memory.
The megatron engine's ``offloaded_for_sampling`` runs it (:mod:`zeda_megatron.training.engine`).

    with offloaded(ddp, optimizer):
        rollout = sample(student, prompts, ...)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class _Offloaded:
    ddp: object
    megatron_optimizers: list
    tensors: list  # (tensor, host copy) pairs offloaded at the storage level


def _leaf_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _has_own_main_params(opt) -> bool:
    """Mixed-precision optimizers keep fp32 main params apart from the model's; FP32Optimizer's
    param groups are the model's own weights (megatron's offload_to_cpu would move the model)."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    cfg = getattr(opt, "config", None)
    if getattr(cfg, "use_precision_aware_optimizer", False) or getattr(cfg, "optimizer_cpu_offload", False):
        # precision-aware (and CPU-offloaded) optimizers hold views into the model's param buffer:
        # offload_to_cpu()'s `p.data = p.data.cpu()` would cut them loose from the model
        return False
    return isinstance(opt, MixedPrecisionOptimizer)


def offload_training_state(ddp, optimizer) -> _Offloaded:
    """Free the grad buffers and the optimizer state until :func:`restore_training_state`.

    Call between steps (after ``optimizer.step()``, before the next backward): the grad buffers come
    back zeroed (they are zeroed at the start of every step anyway). On GPU the mixed-precision
    optimizers use megatron-core's ``offload_to_cpu`` (state and fp32 main params to host memory);
    otherwise the Adam state tensors are copied to the host and their storage released (tensor
    objects, and thus every reference to them, stay valid)."""
    from zeda_megatron.platform import on_cpu

    cpu = on_cpu()
    if ddp is not None:
        ddp.offload_grad_buffers(synchronize=not cpu, empty_cache=not cpu)
    handle = _Offloaded(ddp, [], [])
    for opt in _leaf_optimizers(optimizer) if optimizer is not None else []:
        if not cpu and _has_own_main_params(opt):
            opt.offload_to_cpu()
            handle.megatron_optimizers.append(opt)
            continue
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.numel() > 1 and v.untyped_storage().size() > 0 and (cpu or v.is_cuda):
                    host = v.detach().to("cpu", copy=True)
                    if not cpu:
                        host = host.pin_memory()
                    handle.tensors.append((v, host))
                    v.untyped_storage().resize_(0)
    if not cpu:
        torch.cuda.empty_cache()
    return handle


def restore_training_state(handle: _Offloaded) -> None:
    """Bring back what :func:`offload_training_state` freed (before the update)."""
    from zeda_megatron.platform import on_cpu

    for v, host in handle.tensors:
        v.untyped_storage().resize_(host.numel() * host.element_size())
        v.copy_(host, non_blocking=False)
    for opt in handle.megatron_optimizers:
        opt.restore_from_cpu()
    if handle.ddp is not None:
        handle.ddp.restore_grad_buffers(synchronize=not on_cpu())
    handle.tensors, handle.megatron_optimizers = [], []


@contextlib.contextmanager
def offloaded(ddp, optimizer, enabled: bool = True):
    """``with offloaded(ddp, optimizer): sample(...)`` - training memory is free while sampling."""
    if not enabled:
        yield None
        return
    handle = offload_training_state(ddp, optimizer)
    try:
        yield handle
    finally:
        restore_training_state(handle)
