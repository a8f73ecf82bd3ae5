"""Process-group setup shared by the layer, the bridge, the trainer and the tests.

``torchrun`` (or Slurm's srun through torchrun) provides RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a
plain single process gets a world of one. The backend is NCCL on GPU and gloo on the CPU platform.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from zeda_megatron.platform import on_cpu, setup_platform


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(
    tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, seed: int = 1234, gloo: bool = True
) -> None:
    """Initialise torch.distributed and megatron-core's model-parallel groups (idempotent).

    Raises a ValueError naming the sizes when tp*pp does not divide the world size or ep does not
    divide the data-parallel-with-experts size, before any group is created. ``gloo=False``: no gloo
    side groups (the rehearsal's fake process group cannot back them).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu = setup_platform()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torchrun/srun give MASTER_ADDR/PORT; a lone process gets a private port without touching
        # os.environ (child processes it launches must not inherit a port that is taken).
        init = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group("gloo" if cpu else "nccl", init_method=init, rank=rank, world_size=world)
    from zeda_megatron.layout import check_layout

    check_layout(tp=tp, pp=pp, ep=ep, etp=etp, world_size=dist.get_world_size(), training=False)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=gloo,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def gloo_groups() -> bool:
    """megatron-core's gloo side groups exist (not in the rehearsal: :func:`init_parallel` ``gloo=False``)."""
    from megatron.core import parallel_state

    try:
        return parallel_state.get_data_parallel_group_gloo(with_context_parallel=True) is not None
    except AssertionError:
        return False


def comm_device() -> torch.device:
    """The device collectives run on: CUDA under NCCL, the CPU under gloo."""
    return torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())


def all_reduce_host(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """All-reduce a small host tensor (counters, flags) on the backend's device; returns it on the
    host. A no-op without a process group."""
    if not dist.is_initialized():
        return t
    d = t.to(comm_device())
    dist.all_reduce(d, op=op or dist.ReduceOp.SUM, group=group)
    return d.cpu()


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def hydra_argv(argv: list[str]) -> list[str]:
    """Ranks other than 0 compose the same Hydra config but create no output folder of their own."""
    if int(os.environ.get("RANK", "0")) == 0:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                   "hydra.run.dir=."]
