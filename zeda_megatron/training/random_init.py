"""Random-init HF checkpoints for models without weights (tiny test presets: ``model.hf_dir=null``).

Weights are drawn at a scale where routing, norms and biases all matter (transformers' default init
makes logits nearly flat, which would hide mapping mistakes and routing effects).
"""

from __future__ import annotations

import os

import torch


def randomize_(model, seed: int = 0) -> None:
    """Redraw an HF model's parameters in place: norms around 1, matrices ~ N(0, 1/fan_in), vectors
    and the expert score-correction bias small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def write_random_hf(hf_config: dict, path: str, seed: int) -> str:
    """Build the HF model of ``hf_config`` (a config.json dict with ``model_type``) with transformers'
    own classes, redraw its weights with ``seed`` and save it to ``path`` (atomically). Returns path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(hf_config)
    model_type = hf.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf))
    randomize_(model, seed=seed)
    model.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def teacher_hf_dir(model, run_dir: str, seed: int) -> str:
    """The original model's HF folder for a run (``model``: its :class:`~zeda_megatron.spec.ModelSpec`):
    ``model.hf_dir``, or (random-init test models) a seeded random checkpoint written once into the run
    folder by rank 0. All ranks call."""
    import torch.distributed as dist

    if model.hf_dir:
        return model.hf_dir
    path = os.path.join(run_dir, "teacher_hf")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and not os.path.isfile(os.path.join(path, "config.json")):
        write_random_hf(model.hf_config, path, seed=seed)
    if dist.is_initialized():
        dist.barrier()
    return path
