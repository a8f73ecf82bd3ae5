"""Data for the distillation trainer (the names other modules import; the code lives in one module
per concern):

* :mod:`.tokenizers`: :func:`load_tokenizer`, :class:`HFTokenizer`, :class:`ByteTokenizer`;
* :mod:`.templates`: the one template function family (prompt / response / text -> ids) that
  generation, data preparation, training and evaluation share;
* :mod:`.jsonl`: streamed reading and checking of JSONL files (errors name file, line and key);
* :mod:`.prepared`: tokenised data in megatron-core's indexed format (``python -m zeda_megatron.prepare_data``);
* :mod:`.datasets`: stage-1 document datasets (memory-mapped prepared data, in-memory JSONL,
  synthetic), stage-2 prompt datasets, :func:`build_dataset`;
* :mod:`.batching`: deterministic resumable micro-batches, padded or packed (thd), :func:`prompts_of`.
"""

from __future__ import annotations

from zeda_megatron.training.batching import (  # noqa: F401
    IGNORE_INDEX, PACK_WINDOW, PackPlan, PackedRows, best_fit_decreasing, collate, iterate_batches, pack_documents,
    pad_fraction, prompts_of, sample_indices, step_indices, step_rows,
)
from zeda_megatron.training.datasets import (  # noqa: F401
    DocumentDataset, JsonlDataset, PreparedDataset, PreparedPromptDataset, PromptDataset,
    SyntheticDataset, build_dataset, cut_prompt, data_source_exists, prepared_prefix, prompt_sample,
    sample_from_document,
)
from zeda_megatron.training.jsonl import FORMATS, check_jsonl, iter_jsonl, read_jsonl  # noqa: F401
from zeda_megatron.training.prepared import PreparedData, is_prepared, prepare  # noqa: F401
from zeda_megatron.training.templates import (  # noqa: F401
    encode_prompts, encode_records, encode_responses, encode_texts, prompt_text,
)
from zeda_megatron.training.tokenizers import ByteTokenizer, HFTokenizer, as_tokenizer, load_tokenizer  # noqa: F401


def check_data_file(path: str, fmt: str = "auto", stage: str = "sft") -> str:
    """Check ``data.path`` for ``stage`` without tokenising: a JSONL file is read through (errors name
    the file, line and key); a prepared prefix must hold data for the stage. Returns the format."""
    if is_prepared(str(path)):
        from zeda_megatron.training.prepared import read_meta

        got = read_meta(str(path))["format"]
        if stage == "opd" and got == "text":
            raise ValueError(f"{path}: prepared as text: no prompts for stage=opd")
        if stage != "opd" and got == "prompt":
            raise ValueError(f"{path}: prepared as prompts only: nothing to train on in stage=sft")
        return got
    return check_jsonl(path, fmt, stage)
