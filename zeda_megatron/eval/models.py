"""The models an evaluation runs: HF directories (loaded with remote code), megatron-core checkpoints
exported through the bridge, the null-expert MoE blocks and their compute dial, and the stock teacher
written as a null-expert (PlusPlus) directory for the training-free baselines."""

from __future__ import annotations

import json
import os
import shutil

import torch

from zeda_megatron.embedded.hf_model import load  # noqa: F401 (the one loader; re-exported)

EXPORT_MARKER = ".exported_from"


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def checkpoint_key(ckpt: str) -> str:
    """What identifies a checkpoint's contents: its path and the iteration its ``latest`` names."""
    latest = os.path.join(ckpt, "latest")
    tag = open(latest).read().strip() if os.path.isfile(latest) else ""
    return os.path.abspath(ckpt) + ":" + tag


def export_checkpoint(ckpt: str, out_dir: str, dtype: torch.dtype | None = torch.float32) -> str:
    """Export a megatron-core checkpoint (tools/convert_hf.py's or a training run's ``checkpoints``)
    to the HF directory ``out_dir`` in this process, through the bridge; reused while the checkpoint's
    ``latest`` is unchanged. ``dtype=None`` keeps the checkpoint's."""
    marker = os.path.join(out_dir, EXPORT_MARKER)
    key = checkpoint_key(ckpt)
    if is_hf_dir(out_dir) and os.path.isfile(marker) and open(marker).read() == key:
        return out_dir
    from zeda_megatron.bridge.checkpoint import assets_dir, load_checkpoint
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    init_parallel()
    try:
        model = load_checkpoint(ckpt)
        save_hf_pretrained(model, out_dir, assets_dir=assets_dir(ckpt), null=model.zeda_null, dtype=dtype)
    finally:
        destroy_parallel()
    with open(marker, "w") as f:
        f.write(key)
    return out_dir


def as_hf_dir(path: str, out_dir: str) -> str:
    """``path`` itself when it is an HF directory, else its export into ``out_dir``."""
    return path if is_hf_dir(path) else export_checkpoint(path, out_dir)


# ---- null-expert blocks and the compute dial ---------------------------------------------------------
def null_blocks(model) -> list:
    """(name, module) of the null-expert MoE blocks of a PlusPlus model (empty for a stock model)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "route") and hasattr(m, "num_zce")
            and int(getattr(m, "num_zce", 0)) > 0]


def set_null_logit_bias(model, bias: float) -> None:
    """The compute dial: ``bias`` added to the null experts' router logits in every MoE block."""
    for _, m in null_blocks(model):
        m.zce_logit_bias = float(bias)


def layer_index(name: str) -> int:
    """The decoder layer number in a module name (``model.layers.3.mlp`` -> 3; -1 if none)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == "layers" and i + 1 < len(parts):
            return int(parts[i + 1])
    return -1


def moe_sizes(cfg) -> tuple[int, int, int, int]:
    """(E, K, routed expert ffn F, shared ffn size) of an HF config."""
    E = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None) or \
        getattr(cfg, "num_local_experts", None)
    shared = int(cfg.moe_intermediate_size) * int(getattr(cfg, "n_shared_experts", 0) or 0)
    return int(E), int(cfg.num_experts_per_tok), int(cfg.moe_intermediate_size), shared


def flops_removed_incl_shared(share: float, cfg) -> float:
    """Expert FLOPs removed counting the always-on shared experts: share * K*F / (K*F + F_shared)."""
    _, K, Fm, shared = moe_sizes(cfg)
    return share * K * Fm / (K * Fm + shared)


# ---- a PlusPlus directory straight from a stock teacher (no training) ---------------------------------
def _plusplus_state(sd: dict, info, num_null: int, null_bias: float) -> dict:
    """The stock HF state dict with per-expert weights and ``num_null`` zero router rows appended."""
    from zeda_megatron.bridge.hf_config import GLM

    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            Fm = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :Fm].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = v[e, Fm:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        elif k.endswith("mlp.gate.weight") and v.shape[0] == info.num_experts:
            out[k] = torch.cat([v, torch.zeros(num_null, v.shape[1], dtype=v.dtype)])
        elif k.endswith("mlp.gate.e_score_correction_bias"):
            out[k] = torch.cat([v.float(), torch.full((num_null,), float(null_bias))])
        else:
            out[k] = v
    if info.family == GLM:  # every GLM MoE layer needs the bias buffer
        for k in list(out):
            if k.endswith("mlp.gate.weight") and k.replace("weight", "e_score_correction_bias") not in out:
                out[k.replace("weight", "e_score_correction_bias")] = torch.cat(
                    [torch.zeros(info.num_experts), torch.full((num_null,), float(null_bias))])
    return out


def plusplus_from_teacher(teacher_dir: str, out_dir: str, num_null: int = 4, mask_null: bool = False,
                          null_bias: float = 0.0) -> str:
    """Write the stock HF teacher at ``teacher_dir`` as a null-expert ("++") HF directory with ``num_null``
    untrained null experts (router rows 0, expert bias ``null_bias`` for GLM), loadable with
    ``trust_remote_code=True``. With ``mask_null=True`` it computes exactly what the teacher computes
    (the training-free baselines run on it). No Megatron involved."""
    from safetensors.torch import load_file, save_file

    from zeda_megatron.bridge import remote_code
    from zeda_megatron.bridge.export_hf import hf_config_dict
    from zeda_megatron.bridge.hf_config import model_info, read_config_json

    info = model_info(read_config_json(teacher_dir))
    sd = {}
    for fn in sorted(os.listdir(teacher_dir)):
        if fn.endswith(".safetensors"):
            sd.update(load_file(os.path.join(teacher_dir, fn)))
    os.makedirs(out_dir, exist_ok=True)
    save_file(_plusplus_state(sd, info, num_null, null_bias), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(info, num_null, mask_null=mask_null), f, indent=1)
    src = os.path.dirname(os.path.abspath(remote_code.__file__))
    for fn in remote_code.FILES[info.family]:
        shutil.copy2(os.path.join(src, fn), os.path.join(out_dir, fn))
    shutil.copy2(remote_code.ROUTING_FILE[1], os.path.join(out_dir, remote_code.ROUTING_FILE[0]))
    for fn in os.listdir(teacher_dir):
        if fn.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(os.path.join(teacher_dir, fn), os.path.join(out_dir, fn))
    return out_dir
