"""The check phase's environment check, run on every node of the job (``python -m zeda_megatron.pipeline
env``): python, torch (+ CUDA and the GPU count), megatron-core, Transformer Engine on GPU nodes, and the
project's packages. Nothing is installed on compute nodes: a missing piece stops the job with how to build
the environment."""

from __future__ import annotations

import importlib.util
import sys

from zeda_megatron.pipeline.report import say

MEGATRON_CORE_VERSION = "0.19.2"
PYTHON_MIN = (3, 11)


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HOWTO = """how to build the environment (no installs happen on compute nodes):
  A) on a login node with a shared filesystem:  bash scripts/setup.sh   (then PYTHON=$PWD/.venv/bin/python, the default);
     on GPU nodes also Transformer Engine: .venv/bin/pip install --no-build-isolation transformer_engine[pytorch]
  B) an NGC PyTorch container (torch + CUDA + Transformer Engine inside) with the project on top:
     pip install --no-deps -e . && pip install -r requirements.txt --no-deps (minus torch), then submit with
     SRUN_ARGS="--container-image=<image> --container-mounts=<shared fs>" PYTHON=python sbatch slurm/adapt_glm.sh ...
  see docs/slurm.md."""


def check_environment(need_cuda: bool, gpus: int) -> int:
    """Print what this node has; 0 if it can run the job, 2 (with what is missing and how to build it) if not."""
    import platform

    host = platform.node()
    problems, facts = [], [f"python {sys.version.split()[0]} ({sys.executable})"]
    if sys.version_info < PYTHON_MIN:
        problems.append(f"python >= {PYTHON_MIN[0]}.{PYTHON_MIN[1]} needed, found {sys.version.split()[0]}")
    try:
        import torch

        facts.append(f"torch {torch.__version__}")
        if need_cuda:
            if not torch.cuda.is_available():
                problems.append(f"torch {torch.__version__} sees no CUDA device (CPU build, or no GPU on {host}); "
                                "run on GPU nodes with a CUDA build of torch (job.device=cpu for a CPU trial)")
            else:
                n = torch.cuda.device_count()
                facts.append(f"CUDA {torch.version.cuda}, {n} x {torch.cuda.get_device_name(0)}")
                if n < gpus:
                    problems.append(f"{n} GPUs visible on {host}, the job wants {gpus} per node (job.nproc_per_node)")
    except Exception as e:  # noqa: BLE001
        problems.append(f"torch does not import: {e}")
    try:
        import megatron.core

        facts.append(f"megatron-core {megatron.core.__version__}")
        if megatron.core.__version__.split("+")[0] != MEGATRON_CORE_VERSION:
            problems.append(f"megatron-core {MEGATRON_CORE_VERSION} is the tested version, found {megatron.core.__version__}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"megatron-core does not import: {e}")
    if need_cuda:
        try:
            import transformer_engine  # noqa: F401
            import transformer_engine.pytorch  # noqa: F401

            facts.append(f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"Transformer Engine (transformer_engine.pytorch) does not import: {e}")
    for mod in ("transformers", "hydra", "zeda_megatron"):
        if not module_exists(mod):
            problems.append(f"python package {mod!r} is missing")
    say(f"[check] {host}: " + ", ".join(facts))
    if problems:
        for p in problems:
            say(f"[check] error on {host}: {p}", sys.stderr)
        say(HOWTO, sys.stderr)
        return 2
    return 0
