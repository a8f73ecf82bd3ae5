"""Tokenise JSONL data once into megatron-core's indexed dataset format (.bin/.idx + loss masks).

    python -m zeda_megatron.prepare_data model=qwen3_30b_a3b model.hf_dir=/ckpt/Qwen3-30B-A3B \\
        data.path=sft.jsonl [stage=opd] [data.cache_dir=/scratch/prepared] \\
        [out=/data/sft_qwen3] [force=true]

It resolves the training job's own config (the same conf groups, overrides and checks as
``python -m zeda_megatron.train``) into its run spec, so the tokenizer (``model.hf_dir``, or the byte
tokenizer of a tiny random model), ``data.format`` and ``data.chat_template`` (on for the released
models) are exactly what training will use. Without ``out=`` the output goes where training looks for it: the job then runs with
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


def prepare_spec(spec, out: str | None = None, force: bool = False) -> list[dict]:
    """Prepare the run's ``data.path`` (``spec``: its :class:`~zeda_megatron.spec.RunSpec`) for its stage;
    returns its summary (a list of one)."""
    from zeda_megatron.training.jsonl import iter_jsonl
    from zeda_megatron.training.prepared import default_prefix, is_prepared, prepare
    from zeda_megatron.training.tokenizers import load_tokenizer

    data = spec.data
    if data.path is None:
        raise ValueError("data.path is not set: give the JSONL file to prepare (data.path=FILE)")
    tokenizer = load_tokenizer(spec.model)
    need = "prompt" if spec.stage.needs_sampling else "train"
    if is_prepared(data.path):
        return [{"path": data.path, "prefix": data.path, "skipped": True, "note": "already a prepared prefix"}]
    fmt, _ = iter_jsonl(data.path, data.format, need)
    prefix = out or default_prefix(data.path, tokenizer, fmt, data.chat_template, data.cache_dir)
    meta = prepare(data.path, tokenizer, prefix, fmt, data.chat_template, need=need, force=force)
    return [{"path": data.path, "prefix": prefix, "format": meta["format"], "num_documents": meta["num_documents"],
             "num_tokens": meta["num_tokens"], "num_trained_tokens": meta["num_trained_tokens"],
             "skipped": meta["skipped"]}]


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from zeda_megatron.spec import compose_command, resolve

    try:
        parsed = compose_command(argv, {"out": str, "force": lambda v: v.lower() in ("1", "true", "yes")}, __doc__)
    except Exception as e:  # Hydra's override/composition errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if parsed is None:
        return 0
    opts, cfg = parsed
    try:
        # the training job's spec: the same checks, the same tokenizer, format and template settings
        results = prepare_spec(resolve(cfg), out=opts["out"], force=bool(opts["force"]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
