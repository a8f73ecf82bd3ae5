"""Run a test body in N gloo processes (torch.multiprocessing spawn) and collect per-rank results."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp

from zeda_megatron.distributed import free_port


def _worker(rank, world, port, fn, args, outdir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        payload = ("ok", result)
    except BaseException:  # report the traceback to the parent test
        payload = ("error", traceback.format_exc())
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    from zeda_megatron.distributed import destroy_parallel

    try:
        destroy_parallel()
    except Exception:
        pass


def run_distributed(fn, world: int, *args):
    """Call ``fn(rank, world, *args)`` on ``world`` processes; return the list of results by rank.

    ``fn`` must be a module-level function (it is pickled). Results must be picklable (move
    tensors to CPU). A failure on any rank raises with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(
            _worker, args=(world, free_port(), fn, args, outdir), nprocs=world, join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world):
            with open(os.path.join(outdir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
