#!/usr/bin/env python
"""Export a megatron-core checkpoint written by tools/convert_hf.py (or by training on it) to a
Hugging Face directory.

    python tools/export_hf.py --checkpoint CKPT --out HF_DIR

Without null experts the directory has the stock architecture (Qwen3MoeForCausalLM /
Glm4MoeLiteForCausalLM); with them it has Qwen3MoePlusPlusForCausalLM /
Glm4MoeLitePlusPlusForCausalLM, zce_nums / zce_types / use_zce_mask and its modeling code, loadable
with ``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``. Tokenizer files are
copied through. Under torchrun with --ep/--pp/--tp, every rank writes its own safetensors shard.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory from tools/convert_hf.py")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the exported weights (default: the checkpoint's)")
    p.add_argument("--mask-null-experts", choices=("keep", "true", "false"), default="keep",
                   help="use_zce_mask written to config.json (default: as trained)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import dataclasses

    import torch

    from zeda_megatron.bridge.checkpoint import assets_dir, load_checkpoint
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    init_parallel(tp=args.tp, pp=args.pp, ep=args.ep)
    try:
        model = load_checkpoint(args.checkpoint)
        null = model.zeda_null
        if null is not None and args.mask_null_experts != "keep":
            null = dataclasses.replace(null, mask_null_experts=args.mask_null_experts == "true")
        save_hf_pretrained(model, args.out, assets_dir=assets_dir(args.checkpoint), null=null,
                           dtype=getattr(torch, args.dtype) if args.dtype else None)
        logging.getLogger("export_hf").info("wrote %s", args.out)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
