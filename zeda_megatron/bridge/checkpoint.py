"""megatron-core distributed checkpoints written by ``tools/convert_hf.py``.

Layout of ``CKPT``::

    CKPT/zeda_bridge.json   the HF config.json, null-expert settings, seed, params dtype
    CKPT/hf_assets/         tokenizer / generation-config files of the source HF directory
    CKPT/mcore/             megatron-core ``dist_checkpointing`` checkpoint (torch_dist); its
                            sharded tensors are global, so it loads under any TP x EP x PP layout

``tools/export_hf.py`` builds the model from ``zeda_bridge.json``, loads ``mcore/`` under the
layout it is launched with, and writes the HF directory.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from zeda_megatron.bridge.hf_config import BridgeError, model_info

META = "zeda_bridge.json"
ASSETS = "hf_assets"
MCORE = "mcore"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(model, ckpt_dir: str, *, hf_dir: str | None = None, seed: int | None = None) -> None:
    """Save ``model`` (all ranks call) with the metadata needed to rebuild and export it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    mdir = os.path.join(ckpt_dir, MCORE)
    if _rank0():
        os.makedirs(mdir, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), mdir)
    write_meta(model, ckpt_dir, hf_dir=hf_dir, seed=seed)


def write_meta(model, ckpt_dir: str, *, hf_dir: str | None = None, seed: int | None = None) -> None:
    """Write zeda_bridge.json (and the source's tokenizer files) into ``ckpt_dir``; all ranks call.
    The trainer writes it into its checkpoints folder, so tools/export_hf.py reads training runs too."""
    import torch.distributed as dist

    info, null = model.zeda_hf_info, model.zeda_null
    if _rank0():
        os.makedirs(ckpt_dir, exist_ok=True)
        meta = {
            "hf_config": info.raw,
            "num_null_experts": null.num_null_experts if null else 0,
            "null_weight": null.null_weight if null else 1.0,
            "mask_null_experts": null.mask_null_experts if null else False,
            "seed": seed,
            "params_dtype": str(model.config.params_dtype).replace("torch.", ""),
            "source": os.path.abspath(hf_dir) if hf_dir else None,
        }
        with open(os.path.join(ckpt_dir, META), "w") as f:
            json.dump(meta, f, indent=2)
        if hf_dir:
            from zeda_megatron.bridge.export_hf import copy_assets

            adir = os.path.join(ckpt_dir, ASSETS)
            os.makedirs(adir, exist_ok=True)
            copy_assets(hf_dir, adir)
    if dist.is_initialized():
        dist.barrier()


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        raise BridgeError(f"{ckpt_dir!r} has no {META}: not a checkpoint written by tools/convert_hf.py")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(ckpt_dir: str, **config_overrides):
    """Build this rank's model from ``ckpt_dir``'s metadata and load its weights (any layout)."""
    from megatron.core import dist_checkpointing

    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.mcore.config import NullExpertSettings

    meta = read_meta(ckpt_dir)
    info = model_info(meta["hf_config"])
    null = NullExpertSettings(int(meta["num_null_experts"]), float(meta["null_weight"]),
                              bool(meta["mask_null_experts"]))
    dtype = _DTYPES[meta.get("params_dtype", "float32")]
    model, info, _ = build_model(info, null, params_dtype=dtype, **config_overrides)
    mdir = os.path.join(ckpt_dir, MCORE)
    if os.path.isdir(mdir):
        state = dist_checkpointing.load(model.sharded_state_dict(), mdir)
    else:  # a training run's checkpoints folder: {"model", "optimizer"} per iteration
        from zeda_megatron.bridge.ds_weights import is_deepspeed_checkpoint, load_student_weights

        it = _latest_iteration(ckpt_dir)
        if is_deepspeed_checkpoint(it):  # engine=deepspeed: the student's weights per EP rank beside DeepSpeed's files
            load_student_weights(model, it)
            return model
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, it)["model"]
    model.load_state_dict(state, strict=True)
    return model


def _latest_iteration(ckpt_dir: str) -> str:
    marker = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(marker):
        raise BridgeError(f"{ckpt_dir!r} has neither {MCORE}/ nor a 'latest' marker: not a checkpoint folder")
    with open(marker) as f:
        return os.path.join(ckpt_dir, f.read().strip())


def assets_dir(ckpt_dir: str) -> str | None:
    d = os.path.join(ckpt_dir, ASSETS)
    return d if os.path.isdir(d) else None


def remove(ckpt_dir: str) -> None:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
