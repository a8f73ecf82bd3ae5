"""megatron-core weights (any TP x EP x PP layout) -> a Hugging Face directory.

Every rank converts the tensors it holds (tensor-parallel shards are all-gathered first) and writes
the ones it owns (data-parallel rank 0 for dense tensors, expert-data-parallel rank 0 for experts)
to its own safetensors file; rank 0 writes ``model.safetensors.index.json``, ``config.json``, the
tokenizer files and, for models with null experts, the modeling code. Nothing is gathered to one
process, so exporting a large model needs no more memory per rank than training it.

* Z = 0: the stock architecture (``Qwen3MoeForCausalLM`` / ``Glm4MoeLiteForCausalLM``) in the
  per-expert key layout of released checkpoints.
* Z > 0: ``Qwen3MoePlusPlusForCausalLM`` / ``Glm4MoeLitePlusPlusForCausalLM`` with ``zce_nums``,
  ``zce_types: ["zero"]``, ``use_zce_mask`` and ``auto_map`` pointing at the modeling files copied
  from :mod:`zeda_megatron.bridge.remote_code`, so that
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works with only torch and
  transformers installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from zeda_megatron.bridge.hf_config import (
    PLUS_PLUS_ARCH,
    PLUS_PLUS_MODEL_TYPE,
    STOCK_ARCH,
    BridgeError,
)
from zeda_megatron.bridge.mapping import qkv_to_hf, resolve, rope_to_hf

log = logging.getLogger(__name__)

# Files of the source HF directory that are not copied through (weights, config, code).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".py", ".pyc")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def _gather_tp(t: torch.Tensor, param, fc1: bool, expert_param: bool) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return t
    if expert_param:
        size, group = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_group()
    else:
        size, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    dim = param.partition_dim
    if fc1 and dim == 0:
        gates, ups = zip(*(torch.chunk(p, 2, dim=0) for p in parts))
        return torch.cat(list(gates) + list(ups), dim=0)
    return torch.cat(parts, dim=dim)


def _owner(expert_param: bool) -> bool:
    from megatron.core import parallel_state as ps

    if expert_param:
        return ps.get_expert_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0


@torch.no_grad()
def export_hf_state(model, info=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The HF tensors this rank owns, by HF name (collective over TP groups: call on all ranks)."""
    info = info or model.zeda_hf_info
    cfg = info.raw
    out: dict[str, torch.Tensor] = {}
    bias_parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        entry = resolve(name, model, info)
        if entry is None:
            continue
        full = _gather_tp(param.detach(), param, entry.fc1, entry.expert_param)
        if not _owner(entry.expert_param):
            continue
        full = full.to(dtype) if dtype is not None and full.is_floating_point() and entry.kind not in (
            "expert_bias", "null_expert_bias") else full
        k = entry.kind
        if k == "copy":
            if name == "output_layer.weight" and info.tie_word_embeddings:
                continue
            out[entry.hf[0]] = rope_to_hf(full, entry.rope_rows) if entry.rope_rows else full
        elif k == "qkv":
            q, kk, v = qkv_to_hf(full, int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]))
            out.update(zip(entry.hf, (q, kk, v)))
        elif k == "fc1":
            gate, up = torch.chunk(full, 2, dim=0)
            out[entry.hf[0]], out[entry.hf[1]] = gate, up
        elif k == "expert_fc1":
            gate, up = torch.chunk(full, 2, dim=0)
            out[f"{entry.hf[0]}{entry.expert}.gate_proj.weight"] = gate
            out[f"{entry.hf[0]}{entry.expert}.up_proj.weight"] = up
        elif k == "expert_fc2":
            out[f"{entry.hf[0]}{entry.expert}.down_proj.weight"] = full
        elif k == "router":
            out[entry.hf[0]] = full
        elif k in ("expert_bias", "null_expert_bias"):
            bias_parts.setdefault(entry.hf[0], {})[0 if k == "expert_bias" else 1] = full.float()
        else:  # pragma: no cover
            raise BridgeError(f"unknown mapping kind {k!r} for {name!r}")
    for key, parts in bias_parts.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)])
    return {k: v.contiguous().clone() for k, v in out.items()}


# Keys serving stacks and transformers versions read for the number of routed (real) experts:
# transformers 5 writes Qwen3-MoE's as num_local_experts, transformers 4.x / vLLM / SGLang read
# num_experts; GLM-4.7-Flash's is n_routed_experts (transformers 5 maps num_local_experts to it).
EXPERT_COUNT_KEYS = {"qwen3_moe": ("num_experts", "num_local_experts"),
                     "glm4_moe_lite": ("n_routed_experts", "num_local_experts")}


def hf_config_dict(info, num_null: int, mask_null: bool = False, dtype: torch.dtype = torch.float32,
                   null_logit_bias: float = 0.0) -> dict:
    """config.json for the export: stock architecture when Z = 0, the "++" one otherwise.

    Every key of :data:`EXPERT_COUNT_KEYS` carries the real expert count E (null experts have no
    weights; ``zce_nums`` adds them to the router only); ``torch_dtype`` is written beside ``dtype``
    for transformers 4.x. ``null_logit_bias``: the compute dial (``zce_logit_bias``) as exported."""
    from zeda_megatron.bridge.remote_code import FILES

    cfg = {k: v for k, v in info.raw.items()
           if k not in ("auto_map", "zce_nums", "zce_types", "use_zce_mask", "zce_logit_bias")}
    fam = info.family
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg["torch_dtype"] = cfg["dtype"]
    for key in EXPERT_COUNT_KEYS.get(fam, ()):
        cfg[key] = int(info.num_experts)
    if num_null == 0:
        cfg["model_type"] = fam
        cfg["architectures"] = [STOCK_ARCH[fam]]
        return cfg
    conf_file, model_file = FILES[fam][:2]
    arch = PLUS_PLUS_ARCH[fam]
    cfg.update(
        model_type=PLUS_PLUS_MODEL_TYPE[fam],
        architectures=[arch],
        zce_nums=[int(num_null)],
        zce_types=["zero"],
        use_zce_mask=bool(mask_null),
        zce_logit_bias=float(null_logit_bias),
        auto_map={
            "AutoConfig": f"{conf_file[:-3]}.{arch.replace('ForCausalLM', 'Config')}",
            "AutoModelForCausalLM": f"{model_file[:-3]}.{arch}",
        },
    )
    return cfg


def copy_assets(src_dir: str | None, out_dir: str) -> list[str]:
    """Copy tokenizer / generation-config files (everything but weights, config and code)."""
    copied = []
    if not src_dir or not os.path.isdir(src_dir):
        return copied
    for fname in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, fname)
        if not os.path.isfile(path) or fname in _NOT_COPIED or fname.endswith(_NOT_COPIED_SUFFIXES):
            continue
        if fname.startswith("zeda_") or fname.startswith("."):
            continue
        shutil.copy2(path, os.path.join(out_dir, fname))
        copied.append(fname)
    return copied


def save_hf_pretrained(model, out_dir: str, *, assets_dir: str | None = None, info=None, null=None,
                       dtype: torch.dtype | None = None) -> None:
    """Write ``model`` (this rank's part; call on every rank) as an HF directory in ``out_dir``.

    ``assets_dir``: an HF directory (or the converter's asset folder) whose tokenizer and
    generation-config files are copied through."""
    import torch.distributed as dist

    from zeda_megatron.bridge.remote_code import FILES, ROUTING_FILE

    info = info or model.zeda_hf_info
    null = null if null is not None else getattr(model, "zeda_null", None)
    num_null = null.num_null_experts if null is not None else 0
    mask = null.mask_null_experts if null is not None else False
    dtype = dtype or model.config.params_dtype
    tensors = export_hf_state(model, info, dtype=dtype)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file

    fname = "model.safetensors" if world == 1 else f"model-{rank + 1:05d}-of-{world:05d}.safetensors"
    if tensors:
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    entries = {k: (fname, v.numel() * v.element_size()) for k, v in tensors.items()}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    if rank == 0:
        weight_map, total = {}, 0
        for part in gathered:
            for key, (f, nbytes) in part.items():
                if key in weight_map:
                    raise BridgeError(f"HF tensor {key!r} was written by two ranks ({weight_map[key]}, {f})")
                weight_map[key] = f
                total += nbytes
        if world > 1:
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        cfg = hf_config_dict(info, num_null, mask, dtype)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        if num_null:
            src = os.path.dirname(os.path.abspath(__import__(
                "zeda_megatron.bridge.remote_code", fromlist=["x"]).__file__))
            for fn in FILES[info.family]:
                shutil.copy2(os.path.join(src, fn), os.path.join(out_dir, fn))
            shutil.copy2(ROUTING_FILE[1], os.path.join(out_dir, ROUTING_FILE[0]))
        copy_assets(assets_dir, out_dir)
    if world > 1:
        dist.barrier()
