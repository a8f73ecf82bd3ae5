#!/usr/bin/env python
"""Convert a Hugging Face MoE checkpoint (qwen3_moe, glm4_moe_lite) to a megatron-core checkpoint,
optionally injecting Z null experts into every MoE layer's router.

    python tools/convert_hf.py --hf-dir IN --out CKPT [--null-experts N | --null-ratio R] [--seed S] [--dtype D]

The parameters keep the source checkpoint's dtype (an fp32 checkpoint stays fp32, as transformers'
``dtype="auto"``); ``--dtype float32|bfloat16|float16`` converts.

Runs in one process by default; under ``torchrun --nproc-per-node K`` with ``--ep``/``--pp``/``--tp``
each rank reads only the safetensors tensors of its own shard. The output is a megatron-core
distributed checkpoint (``CKPT/mcore``) plus ``CKPT/zeda_bridge.json`` (HF config, null-expert
settings) and ``CKPT/hf_assets`` (tokenizer files); it loads under any TP x EP x PP layout
(``zeda_megatron.bridge.checkpoint.load_checkpoint``, ``tools/export_hf.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--null-experts", type=int, default=None, help="Z, null experts per MoE layer")
    z.add_argument("--null-ratio", type=float, default=None, help="Z/E, e.g. 0.5")
    p.add_argument("--seed", type=int, default=1234, help="seed of the null router rows (default 1234)")
    p.add_argument("--mask-null-experts", action="store_true", help="store the model with null experts masked")
    p.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                   help="parameter dtype of the checkpoint (default auto: the source checkpoint's own dtype, "
                        "as transformers' dtype='auto'; an fp32 checkpoint stays fp32)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    return p.parse_args(argv)


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def source_dtype(hf_dir: str) -> str:
    """The dtype of the checkpoint's floating-point weights (safetensors headers; config.json's
    ``dtype`` / ``torch_dtype`` when there is no safetensors file). Mixed dtypes: the most common one."""
    import json
    import math
    import struct
    from collections import Counter

    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    counts = Counter()
    for name in files:
        with open(os.path.join(hf_dir, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key != "__metadata__" and meta.get("dtype") in _SAFETENSORS_DTYPES:
                shape = meta.get("shape") or [1]
                counts[_SAFETENSORS_DTYPES[meta["dtype"]]] += math.prod(shape)
    if counts:
        return counts.most_common(1)[0][0]
    cfg_path = os.path.join(hf_dir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        d = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").replace("torch.", "")
        if d in DTYPES:
            return d
    return "bfloat16"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from zeda_megatron.bridge.checkpoint import save_checkpoint
    from zeda_megatron.bridge.import_hf import import_hf
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    if os.path.exists(os.path.join(args.out, "mcore")):
        print(f"error: {args.out!r} already holds a checkpoint; choose a new --out", file=sys.stderr)
        return 2
    dtype = source_dtype(args.hf_dir) if args.dtype == "auto" and os.path.isdir(args.hf_dir) else args.dtype
    if dtype == "auto":
        dtype = "bfloat16"  # no such folder: import_hf names the problem below
    logging.getLogger("convert_hf").info("parameter dtype: %s%s", dtype, " (the source's)" if args.dtype == "auto" else "")
    init_parallel(tp=args.tp, pp=args.pp, ep=args.ep, seed=args.seed)
    try:
        model, report = import_hf(
            args.hf_dir, num_null_experts=args.null_experts, null_ratio=args.null_ratio, seed=args.seed,
            mask_null_experts=args.mask_null_experts or None, params_dtype=getattr(torch, dtype),
        )
        save_checkpoint(model, args.out, hf_dir=args.hf_dir, seed=args.seed)
        null = model.zeda_null
        logging.getLogger("convert_hf").info(
            "wrote %s: %s, E=%d, Z=%d, %d router tensors initialised", args.out, model.zeda_hf_info.family,
            model.zeda_hf_info.num_experts, null.num_null_experts if null else 0, len(report["generated"]),
        )
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
