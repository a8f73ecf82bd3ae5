"""Tokenised data on disk: megatron-core's indexed dataset format, written once, read memory-mapped.

A prepared prefix ``P`` holds

* ``P.bin`` / ``P.idx``: the token ids, one sequence (= one document = one sample) per JSONL line
  (megatron-core ``IndexedDataset``; uint16 for vocabularies under 65500 ids, else int32);
* ``P_mask.bin`` / ``P_mask.idx``: the loss mask, a uint8 indexed dataset aligned token by token
  (``mask[j] == 1``: ``ids[j]`` is trained, predicted from ``ids[:j]``);
* ``P_first.npy``: per document, the index of its first trained id (``len(ids)`` when none: prompts);
* ``P.json``: what it was made from (source file size and mtime, tokenizer fingerprint, chat
  template, format, counts). Written last: a prefix without it is incomplete and never read.

:func:`prepare` writes all of it under temporary names and renames them into place (atomic per file,
the metadata last), under a file lock, so ranks that start together prepare once and the others
wait; it returns at once when the output is up to date. Token ids come from
:func:`zeda_megatron.training.templates.encode_records` (the shared template).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from array import array
from contextlib import contextmanager

import numpy as np

from zeda_megatron.training.jsonl import iter_jsonl
from zeda_megatron.training.templates import encode_records

log = logging.getLogger(__name__)

VERSION = 1
CHUNK = 2048  # records tokenised per batch


def paths(prefix: str) -> dict:
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "mask_bin": prefix + "_mask.bin",
            "mask_idx": prefix + "_mask.idx", "first": prefix + "_first.npy", "meta": prefix + ".json"}


def is_prepared(prefix: str) -> bool:
    """Whether ``prefix`` is a complete prepared dataset (its metadata exists)."""
    p = paths(str(prefix))
    return all(os.path.isfile(p[k]) for k in ("bin", "idx", "mask_bin", "mask_idx", "first", "meta"))


def read_meta(prefix: str) -> dict:
    with open(paths(prefix)["meta"]) as f:
        return json.load(f)


def _source_info(path: str) -> dict:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def expected_meta(path: str, tokenizer, fmt: str, chat_template: bool) -> dict:
    return {"version": VERSION, **_source_info(path), "tokenizer": tokenizer.fingerprint(),
            "chat_template": bool(chat_template), "format": fmt}


def up_to_date(prefix: str, expect: dict) -> bool:
    if not is_prepared(prefix):
        return False
    try:
        meta = read_meta(prefix)
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in expect.items())


def default_prefix(path: str, tokenizer, fmt: str, chat_template: bool, cache_dir: str | None = None) -> str:
    """Where a JSONL file is prepared when training is pointed at it: ``cache_dir`` (default: a
    ``.zeda_prepared`` folder next to the file) / ``<name>.<key>``, the key covering the file's path,
    the tokenizer, the template and the format (so differently tokenised copies never collide)."""
    path = os.path.abspath(str(path))
    key = hashlib.sha256(json.dumps([path, tokenizer.fingerprint(), bool(chat_template), fmt]).encode())
    folder = cache_dir or os.path.join(os.path.dirname(path), ".zeda_prepared")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(str(folder), f"{stem}.{key.hexdigest()[:12]}")


@contextmanager
def _locked(prefix: str):
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    with open(prefix + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(path: str, tokenizer, prefix: str, fmt: str = "auto", chat_template: bool = False,
            need: str = "train", force: bool = False) -> dict:
    """Tokenise the JSONL ``path`` into the prepared dataset ``prefix`` (see the module doc).

    ``need``: "train" (stage 1: prompt_response or text) or "prompt" (stage 2). Returns the metadata;
    ``meta["skipped"]`` is True when ``prefix`` was already up to date (nothing rewritten).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    path, prefix = str(path), str(prefix)
    resolved, records = iter_jsonl(path, fmt, need)  # format errors before anything is written
    expect = expected_meta(path, tokenizer, resolved, chat_template)
    if not force and up_to_date(prefix, expect):
        return {**read_meta(prefix), "skipped": True}
    with _locked(prefix):
        if not force and up_to_date(prefix, expect):  # another rank/process prepared it meanwhile
            return {**read_meta(prefix), "skipped": True}
        t0 = time.time()
        p = paths(prefix)
        tmp = {k: f"{v}.tmp{os.getpid()}" for k, v in p.items()}
        dtype = DType.optimal_dtype(tokenizer.vocab_size)
        ids_b = IndexedDatasetBuilder(tmp["bin"], dtype=dtype)
        mask_b = IndexedDatasetBuilder(tmp["mask_bin"], dtype=np.uint8)
        first = array("i")
        n_tokens = n_trained = 0
        try:
            chunk: list[dict] = []

            def flush():
                nonlocal n_tokens, n_trained
                for ids, f in encode_records(tokenizer, chunk, resolved, chat_template):
                    a = np.asarray(ids, dtype=np.int64)
                    if a.size and (a.min() < 0 or a.max() >= tokenizer.vocab_size):
                        raise ValueError(f"{path}: token id outside the vocabulary ({tokenizer.vocab_size})")
                    m = np.zeros(a.size, dtype=np.uint8)
                    m[f:] = 1
                    ids_b.add_item(_as_tensor(a))
                    ids_b.end_document()
                    mask_b.add_item(_as_tensor(m))
                    mask_b.end_document()
                    first.append(min(f, a.size))
                    n_tokens += a.size
                    n_trained += int(m.sum())
                chunk.clear()

            for _, rec in records:
                chunk.append(rec)
                if len(chunk) >= CHUNK:
                    flush()
            flush()
            ids_b.finalize(tmp["idx"])
            mask_b.finalize(tmp["mask_idx"])
            with open(tmp["first"], "wb") as f:
                np.save(f, np.frombuffer(first, dtype=np.int32))
            meta = {**expect, "num_documents": len(first), "num_tokens": n_tokens, "num_trained_tokens": n_trained,
                    "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "need": need,
                    "prepare_seconds": round(time.time() - t0, 3)}
            with open(tmp["meta"], "w") as f:
                json.dump(meta, f, indent=1)
            if os.path.exists(p["meta"]):
                os.remove(p["meta"])  # the old prefix is incomplete from here until the new metadata lands
            for k in ("bin", "idx", "mask_bin", "mask_idx", "first", "meta"):
                os.replace(tmp[k], p[k])
        finally:
            for v in tmp.values():
                if os.path.exists(v):
                    os.remove(v)
    log.info("prepared %s -> %s: %d documents, %d tokens (%.1fs)", path, prefix, meta["num_documents"],
             n_tokens, meta["prepare_seconds"])
    return {**meta, "skipped": False}


def _advise_random(memmap) -> None:
    """No read-ahead / fault-around on a numpy memmap (random access touches one page per lookup)."""
    import mmap as _mmap

    m = getattr(memmap, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(_mmap, "MADV_RANDOM"):
        m.madvise(_mmap.MADV_RANDOM)


def _as_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(a)


class PreparedData:
    """Memory-mapped access to a prepared prefix: ``ids(i)``, ``mask(i)`` (numpy views), ``lengths``
    and ``first`` (mmapped, document-aligned); nothing is read until asked for."""

    def __init__(self, prefix: str, tokenizer=None, chat_template: bool | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        prefix = str(prefix)
        if not is_prepared(prefix):
            raise ValueError(f"{prefix!r} is not a prepared dataset (no {prefix}.json/.bin/.idx); "
                             "run python -m zeda_megatron.prepare_data, or point data.path at a JSONL file")
        self.prefix, self.meta = prefix, read_meta(prefix)
        if tokenizer is not None and self.meta["tokenizer"] != tokenizer.fingerprint():
            raise ValueError(f"{prefix} was prepared with another tokenizer ({self.meta['tokenizer']}, this model's is "
                             f"{tokenizer.fingerprint()}); prepare it again with this model")
        if chat_template is not None and bool(self.meta["chat_template"]) != bool(chat_template):
            raise ValueError(f"{prefix} was prepared with chat_template={self.meta['chat_template']} but "
                             f"data.chat_template={bool(chat_template)}; prepare it again or change data.chat_template")
        self.format = self.meta["format"]
        # .bin files are read with positioned reads (megatron's mmap=False reader): a rank's resident memory
        # stays flat however many samples it has touched; the .idx stays memory-mapped, advised random
        self._ids = IndexedDataset(prefix, mmap=False)
        self._mask = IndexedDataset(prefix + "_mask", mmap=False)
        self.first = np.load(paths(prefix)["first"], mmap_mode="r")
        for m in (self._ids.index.bin_buffer_mmap, self._mask.index.bin_buffer_mmap, self.first):
            _advise_random(m)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def lengths(self) -> np.ndarray:
        return self._ids.sequence_lengths

    def ids(self, i: int, length: int | None = None) -> np.ndarray:
        """The first ``length`` ids of document ``i`` (all when None)."""
        n = int(self.lengths[i])
        return self._ids.get(int(i), 0, n if length is None else min(int(length), n))

    def mask(self, i: int, length: int | None = None) -> np.ndarray:
        n = int(self.lengths[i])
        return self._mask.get(int(i), 0, n if length is None else min(int(length), n))
