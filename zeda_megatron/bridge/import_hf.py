"""Hugging Face safetensors -> megatron-core weights, with optional null-expert injection.

Each rank opens the safetensors files lazily (``safetensors.safe_open``) and reads only the tensors
its model shard holds: its pipeline stage's layers and, for MoE layers, its expert-parallel slice of
the experts (from per-expert keys, or one row of fused 3D expert tensors via ``get_slice``). A large
checkpoint is therefore never loaded whole into one process once EP/PP split it. (Non-expert
tensors are read whole and then cut for tensor parallelism.)

Null-expert injection (ZEDA's ``convert-hf-to-ZCE.py`` recipe, done at import): for every MoE layer
the Z new router rows are drawn from N(mean_d, std_d) where mean/std are per hidden dimension over
the E existing rows (``torch.std``, unbiased), with a generator seeded ``seed + layer_index`` (so the
result does not depend on the parallel layout); the expert-score bias, when the router has one, is
extended with draws from N(mean, std) of the E biases (scalars). Rows 0..E-1 are copied bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch

from zeda_megatron.bridge.hf_config import BridgeError, model_info, read_config_json
from zeda_megatron.bridge.mapping import qkv_to_mcore, resolve, rope_to_mcore

log = logging.getLogger(__name__)

DEFAULT_SEED = 1234


class HFCheckpointReader:
    """Lazy, per-tensor access to the safetensors files of an HF directory."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        else:
            single = os.path.join(hf_dir, "model.safetensors")
            if not os.path.isfile(single):
                raise BridgeError(
                    f"{hf_dir!r} has neither model.safetensors nor model.safetensors.index.json "
                    "(only safetensors checkpoints are supported)"
                )
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        self._handles = {}
        self.reads: list[str] = []  # keys read, in order (tests check that ranks read only their part)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _file(self, key: str):
        from safetensors import safe_open

        fname = self.weight_map[key]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.hf_dir, fname), "pt")
        return self._handles[fname]

    def get(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise BridgeError(f"tensor {key!r} is missing from the checkpoint in {self.hf_dir!r}")
        self.reads.append(key)
        return self._file(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice."""
        if key not in self.weight_map:
            raise BridgeError(f"tensor {key!r} is missing from the checkpoint in {self.hf_dir!r}")
        self.reads.append(f"{key}[{index}]")
        return self._file(key).get_slice(key)[index]

    def close(self):
        self._handles.clear()


# ---------------------------------------------------------------------------------------------
def null_router_rows(old: torch.Tensor, num_null: int, seed: int) -> torch.Tensor:
    """Z rows ~ N(per-dimension mean, per-dimension std) of ``old`` [E, H] (fp32 math)."""
    gen = torch.Generator().manual_seed(seed)
    o = old.float()
    mean, std = o.mean(dim=0), o.std(dim=0)
    return (torch.randn(num_null, o.shape[1], generator=gen) * std + mean).to(old.dtype)


def null_bias_values(old: torch.Tensor, num_null: int, seed: int) -> torch.Tensor:
    """Z biases ~ N(mean, std) of the E existing biases (scalars)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    o = old.float()
    mean, std = o.mean(), o.std() if o.numel() > 1 else torch.zeros(())
    return (torch.randn(num_null, generator=gen) * std + mean).to(old.dtype)


def _expert_tensor(reader: HFCheckpointReader, prefix: str, e: int, which: str) -> torch.Tensor:
    """One expert's fc1 ([gate; up], [2F, H]) or fc2 ([H, F]) in megatron layout."""
    legacy = f"{prefix}{e}.gate_proj.weight"
    if legacy in reader:
        if which == "fc1":
            return torch.cat([reader.get(legacy), reader.get(f"{prefix}{e}.up_proj.weight")], dim=0)
        return reader.get(f"{prefix}{e}.down_proj.weight")
    fused = prefix + ("gate_up_proj" if which == "fc1" else "down_proj")
    if fused in reader:
        return reader.get_row(fused, e)
    raise BridgeError(
        f"expert {e} tensors are missing from the checkpoint: neither {legacy!r} nor {fused!r} found"
    )


def _tp_info(expert_param: bool):
    from megatron.core import parallel_state as ps

    if expert_param:
        return ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def shard_for_rank(full: torch.Tensor, param, fc1: bool, expert_param: bool) -> torch.Tensor:
    """Cut a full megatron tensor to this rank's TP shard (as the parameter says it is split)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size, rank = _tp_info(expert_param)
    if size == 1:
        return full
    dim = param.partition_dim
    if fc1 and dim == 0:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], dim=0)
    return torch.chunk(full, size, dim=dim)[rank]


def _num_null(model) -> int:
    null = getattr(model, "zeda_null", None)
    return null.num_null_experts if null is not None else 0


@torch.no_grad()
def load_hf_weights(model, hf_dir: str, *, seed: int = DEFAULT_SEED, reader=None, info=None) -> dict:
    """Fill ``model`` (built by :func:`zeda_megatron.bridge.builders.build_model` for this rank)
    from the HF checkpoint in ``hf_dir``. Null router rows are taken from the checkpoint when it
    already has them (a "++" export, ``zce_nums``) and drawn as described in the module docstring
    otherwise. Returns a report: ``{"read": [...], "skipped": [...], "generated": [...]}``."""
    info = info or getattr(model, "zeda_hf_info", None) or model_info(read_config_json(hf_dir))
    ckpt_info = model_info(read_config_json(hf_dir))
    if ckpt_info.family != info.family:
        raise BridgeError(
            f"checkpoint in {hf_dir!r} is model_type={ckpt_info.raw.get('model_type')!r} but the model was "
            f"built for family {info.family!r}"
        )
    reader = reader or HFCheckpointReader(hf_dir)
    cfg = info.raw
    E = info.num_experts
    Z = _num_null(model)
    Zc = ckpt_info.num_null_experts
    if Zc and Zc != Z:
        raise BridgeError(
            f"checkpoint has zce_nums=[{Zc}] null experts but the model was built with "
            f"num_null_experts={Z}; build it with the checkpoint's count"
        )
    generated = []
    state = model.state_dict(keep_vars=True)
    for name, param in state.items():
        entry = resolve(name, model, info)
        if entry is None:
            continue
        k = entry.kind
        if k == "copy":
            key = entry.hf[0]
            if key not in reader and entry.meta.get("tied_fallback") and info.tie_word_embeddings:
                key = entry.meta["tied_fallback"]
            full = reader.get(key)
            if entry.rope_rows is not None:
                full = rope_to_mcore(full, entry.rope_rows)
        elif k == "qkv":
            full = qkv_to_mcore(*(reader.get(h) for h in entry.hf), int(cfg["num_attention_heads"]),
                                int(cfg["num_key_value_heads"]))
        elif k == "fc1":
            full = torch.cat([reader.get(h) for h in entry.hf], dim=0)
        elif k in ("expert_fc1", "expert_fc2"):
            full = _expert_tensor(reader, entry.hf[0], entry.expert, "fc1" if k == "expert_fc1" else "fc2")
        elif k == "router":
            w = reader.get(entry.hf[0])
            if w.shape[0] not in (E, E + Z) or (w.shape[0] == E + Z and Zc != Z):
                raise BridgeError(
                    f"tensor {entry.hf[0]!r} has {w.shape[0]} rows; expected E={E} "
                    f"(or E+Z={E + Z} for a checkpoint with zce_nums=[{Z}])"
                )
            if Z and w.shape[0] == E:
                w = torch.cat([w, null_router_rows(w, Z, seed + entry.layer)], dim=0)
                generated.append(name)
            full = w
        elif k == "expert_bias":
            b = reader.get(entry.hf[0])
            full = b[:E]
        elif k == "null_expert_bias":
            b = reader.get(entry.hf[0])
            if b.shape[0] == E + Z and Zc == Z:
                full = b[E:]
            else:
                full = null_bias_values(b[:E], Z, seed + entry.layer)
                generated.append(name)
        else:  # pragma: no cover
            raise BridgeError(f"unknown mapping kind {k!r} for {name!r}")
        local = shard_for_rank(full, param, entry.fc1, entry.expert_param)
        if tuple(local.shape) != tuple(param.shape):
            raise BridgeError(
                f"shape mismatch for megatron tensor {name!r} from HF {entry.hf}: checkpoint gives "
                f"{tuple(local.shape)}, model expects {tuple(param.shape)} (config.json and the weights disagree?)"
            )
        param.data.copy_(local.to(param.dtype))
    # Anything in the checkpoint beyond the model's layers (e.g. GLM's MTP layer) is not loaded.
    n = info.num_layers
    extra = sorted({m.group(1) for key in reader.weight_map for m in [re.match(r"model\.layers\.(\d+)\.", key)]
                    if m and int(m.group(1)) >= n})
    if extra:
        log.warning(
            "checkpoint layers %s are beyond num_hidden_layers=%d (multi-token-prediction layers, "
            "num_nextn_predict_layers=%s): skipped, not loaded", extra, n, cfg.get("num_nextn_predict_layers")
        )
    report = {"read": list(reader.reads), "skipped_layers": extra, "generated": generated}
    reader.close()
    return report


def import_hf(hf_dir: str, *, num_null_experts: int | None = None, null_ratio: float | None = None,
              seed: int = DEFAULT_SEED, null_weight: float = 1.0, mask_null_experts: bool | None = None,
              params_dtype=torch.float32, **config_overrides):
    """Build this rank's model for ``hf_dir`` and load it. Z from ``num_null_experts`` or
    ``null_ratio`` (Z/E), or from the checkpoint's ``zce_nums`` when neither is given;
    ``mask_null_experts`` defaults to the checkpoint's ``use_zce_mask``.
    Returns ``(model, report)``."""
    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.mcore.config import NullExpertSettings
    from zeda_megatron.mcore.specs import settings_from

    info = model_info(read_config_json(hf_dir))
    if mask_null_experts is None:  # a "++" checkpoint says whether its null experts are masked
        mask_null_experts = bool(info.raw.get("use_zce_mask", False))
    if num_null_experts is None and null_ratio is None:
        null = NullExpertSettings(info.num_null_experts, null_weight, mask_null_experts)
    else:
        null = settings_from(info.num_experts, num_null_experts=num_null_experts, null_ratio=null_ratio,
                             null_weight=null_weight, mask_null_experts=mask_null_experts)
    model, info, _ = build_model(info, null, params_dtype=params_dtype, **config_overrides)
    report = load_hf_weights(model, hf_dir, seed=seed, info=info)
    return model, report
