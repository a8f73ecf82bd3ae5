"""One rank of the full-size job in a process of its own, without memory: a fake process group of the
layout's world size and ``FakeTensorMode`` on the CPU device (fake "cuda" tensors abort a CPU-only
torch build; the bytes are the same).

What megatron-core needs to run on data-free tensors, each bridged for this process only (the
rehearsal's own process: nothing here is installed in a training run):

* gloo side groups cannot live on the fake store: ``init_parallel(gloo=False)`` and the optimizer
  without gloo groups (:func:`zeda_megatron.distributed.gloo_groups`);
* ``all_gather_object`` (the optimizer aligns its param groups over ranks) reads tensor sizes: every
  rank of a fake world holds what this one holds;
* the DDP grad buffer's coalesced reduce-scatter has no fake implementation: the collectives go one
  by one (synchronous, as ``overlap_grad_reduce=False`` issues them anyway);
* the distributed optimizer accepts only ``torch.cuda.*Tensor`` type strings and the CPU-offload
  optimizer splits parameters by ``is_cuda`` and pins host copies: while the optimizer is built and
  steps, tensors report the CUDA type and pinning is a no-op;
* the gradient norm is read on the host: it reads as 0 (:mod:`zeda_megatron.assumptions`: reported
  values carry no data), so clipping does not scale.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init_fake_world(spec, rank: int) -> None:
    """This process is ``rank`` of the layout's world on a fake process group, with megatron-core's
    model-parallel groups of the spec's layout."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from zeda_megatron.distributed import init_parallel

    os.environ.setdefault("ZEDA_FORCE_CPU", "1")
    lay = spec.layout
    if not dist.is_initialized():
        dist.init_process_group("fake", rank=rank, world_size=lay.world, store=FakeStore())
    init_parallel(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, seed=spec.seed, gloo=False)
    install_fake_collectives()


def install_fake_collectives() -> None:
    """``all_gather_object`` returns this rank's object for every rank; megatron-core's coalescing
    manager issues each collective on its own."""
    from megatron.core.distributed import param_and_grad_buffer

    def all_gather_object(object_list, obj, group=None):
        for i in range(len(object_list)):
            object_list[i] = obj

    dist.all_gather_object = all_gather_object

    class _Done:
        def wait(self):
            return None

    @contextlib.contextmanager
    def one_by_one(group=None, device=None, async_ops=False):
        yield _Done()

    param_and_grad_buffer._coalescing_manager = one_by_one
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for module in (optimizer, distrib_optimizer):
        if hasattr(module, "get_grad_norm_fp32"):
            module.get_grad_norm_fp32 = lambda *a, **k: 0.0


@contextlib.contextmanager
def tensors_as_cuda():
    """While megatron-core's optimizer is built and steps: tensors report CUDA types (``type()``,
    ``is_cuda``) and pinning host memory is a no-op (fake CPU tensors stand for GPU tensors)."""
    Tensor = torch.Tensor
    orig_type, orig_pin = Tensor.type, Tensor.pin_memory
    orig_empty = torch.empty

    def type_(self, dtype=None, non_blocking=False, **kw):
        if dtype is None:
            name = orig_type(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, non_blocking, **kw)

    def empty(*args, pin_memory=False, **kw):
        return orig_empty(*args, **kw)

    Tensor.type = type_
    Tensor.is_cuda = property(lambda self: True)
    Tensor.pin_memory = lambda self, *a, **k: self
    torch.empty = empty
    try:
        yield
    finally:
        Tensor.type = orig_type
        del Tensor.is_cuda
        Tensor.pin_memory = orig_pin
        torch.empty = orig_empty
