"""Tokenise JSONL data once into megatron-core's indexed dataset format (.bin/.idx + loss masks).

    python -m zeda_megatron.prepare_data model=qwen3_30b_a3b model.hf_dir=/ckpt/Qwen3-30B-A3B \\
        data.path=sft.jsonl [stage=opd] [data.cache_dir=/scratch/prepared] \\
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
import sys

def prepare_config(cfg, out: str | None = None, force: bool = False) -> list[dict]:
    """Prepare ``cfg.data.path`` for ``cfg.stage``; returns its summary (a list of one)."""
    from zeda_megatron.training.jsonl import iter_jsonl
    from zeda_megatron.training.prepared import default_prefix, is_prepared, prepare
    from zeda_megatron.training.tokenizers import cfg_get, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    chat = bool(cfg_get(cfg.data, "chat_template", False))
    need = "prompt" if cfg.stage.name == "opd" else "train"
    if cfg.data.path is None:
        raise ValueError("data.path is not set: give the JSONL file to prepare (data.path=FILE)")
    path = str(cfg.data.path)
    if is_prepared(path):
        return [{"path": path, "prefix": path, "skipped": True, "note": "already a prepared prefix"}]
    fmt, _ = iter_jsonl(path, cfg_get(cfg.data, "format", "auto"), need)
    prefix = out or default_prefix(path, tokenizer, fmt, chat, cfg_get(cfg.data, "cache_dir"))
    meta = prepare(path, tokenizer, prefix, fmt, chat, need=need, force=force)
    return [{"path": path, "prefix": prefix, "format": meta["format"], "num_documents": meta["num_documents"],
             "num_tokens": meta["num_tokens"], "num_trained_tokens": meta["num_trained_tokens"],
             "skipped": meta["skipped"]}]


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
    from zeda_megatron.spec import compose

    try:
        cfg = compose(overrides, run_dir=".")
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
