"""Tokenise JSONL data once into megatron-core's indexed dataset format (.bin/.idx + loss masks).

    python -m zeda_megatron.prepare_data model=qwen3_30b_a3b model.hf_dir=/ckpt/Qwen3-30B-A3B \\
        data.path=sft.jsonl [data.eval_path=heldout.jsonl] [stage=opd] [data.cache_dir=/scratch/prepared] \\
        [out=/data/sft_qwen3] [force=true]

It composes the training job's own config (the same conf groups and overrides as
``python -m zeda_megatron.train``), so the tokenizer (``model.hf_dir``, or the byte tokenizer of a tiny
random model), ``data.format`` and ``data.chat_template`` (on for the released models) are exactly what
training will use. Without ``out=`` the output goes where training looks for it: the job then runs with
the same ``data.path=sft.jsonl`` and reads the prepared copy (no tokenising). With ``out=PREFIX`` train
with ``data.path=PREFIX``. Already up-to-date output (same file size and mtime, tokenizer, template and
format) is left alone; ``force=true`` rewrites it. Errors name the file, the line and the key; output is
written under temporary names and renamed into place, so an interrupted run leaves nothing half-written.

Prints one JSON line per file: ``{"path", "prefix", "format", "num_documents", "num_tokens",
"num_trained_tokens", "skipped"}``.
"""

from __future__ import annotations

import json
import os
import sys

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hcompose("config", overrides=["run_dir=.", *overrides])


def prepare_config(cfg, out: str | None = None, force: bool = False) -> list[dict]:
    """Prepare ``cfg.data.path`` (and ``cfg.data.eval_path``) for ``cfg.stage``; returns one summary each."""
    from zeda_megatron.training.jsonl import iter_jsonl
    from zeda_megatron.training.prepared import default_prefix, is_prepared, prepare
    from zeda_megatron.training.tokenizers import cfg_get, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    chat = bool(cfg_get(cfg.data, "chat_template", False))
    need = "prompt" if cfg.stage.name == "opd" else "train"
    sources = [("path", cfg.data.path, out), ("eval_path", cfg.data.eval_path, out and out + "_eval")]
    if cfg.data.path is None:
        raise ValueError("data.path is not set: give the JSONL file to prepare (data.path=FILE)")
    results = []
    for key, path, prefix in sources:
        if path is None:
            continue
        path = str(path)
        if is_prepared(path):
            results.append({"path": path, "prefix": path, "skipped": True, "note": "already a prepared prefix"})
            continue
        fmt, _ = iter_jsonl(path, cfg_get(cfg.data, "format", "auto"), need)
        prefix = prefix or default_prefix(path, tokenizer, fmt, chat, cfg_get(cfg.data, "cache_dir"))
        meta = prepare(path, tokenizer, prefix, fmt, chat, need=need, force=force)
        results.append({"path": path, "prefix": prefix, "format": meta["format"],
                        "num_documents": meta["num_documents"], "num_tokens": meta["num_tokens"],
                        "num_trained_tokens": meta["num_trained_tokens"], "skipped": meta["skipped"]})
    return results


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    out, force, overrides = None, False, []
    for a in argv:
        if a.startswith("out="):
            out = a[4:]
        elif a.startswith("force="):
            force = a[6:].lower() in ("1", "true", "yes")
        else:
            overrides.append(a)
    try:
        cfg = compose(overrides)
    except Exception as e:  # Hydra's override/composition errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = prepare_config(cfg, out=out, force=force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
