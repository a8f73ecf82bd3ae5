"""Datasets of the trainer.

Stage 1 (``stage=sft``) datasets are *document* datasets: document ``i`` is a token id sequence
with a loss mask (``document(i) -> (ids, mask)``, cut to ``seq_length + 1`` ids), from which

* ``ds[i]`` gives a padded sample of length ``S = seq_length`` (the contract's batch format: ``tokens``,
  ``labels`` (megatron-style shifted: ``labels[i]`` is predicted from ``tokens[:i+1]``, -100 where not
  trained), ``loss_mask``, ``position_ids``, ``padding_mask`` (True on pads, which sit on the right),
  ``prompt_length``);
* :mod:`.batching` packs several documents into one sequence (``data.packing``).

A document with no trained token within ``S + 1`` ids (a prompt longer than the sequence) is skipped.

* :class:`PreparedDataset`: a prepared prefix (:mod:`.prepared`), memory-mapped: nothing is read
  until a rank asks for its own samples, so a rank's memory does not grow with the dataset.
* :class:`JsonlDataset`: a JSONL file tokenised in memory (small files, tests).
* :class:`SyntheticDataset`: a built-in learnable corpus for tiny random-init models (no files).

Stage 2 (``stage=opd``) prompt datasets (:class:`PreparedPromptDataset`, :class:`PromptDataset`, the
synthetic corpus with ``stage="opd"``) give left-aligned prompts padded to ``S`` with
``prompt_length``; prompts are cut to ``S - max_new_tokens`` ids keeping their end (where the
question and the generation prompt are); :func:`zeda_megatron.training.batching.prompts_of` turns a
batch into id lists.

:func:`build_dataset` picks the dataset for a composed config: ``data.path`` a prepared prefix (used
as is), a JSONL file (prepared once into ``data.cache_dir``, then read like a prefix), or null (the
synthetic corpus).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from zeda_megatron.training.jsonl import read_jsonl
from zeda_megatron.training.prepared import PreparedData, default_prefix, is_prepared, prepare
from zeda_megatron.training.templates import encode_prompts, encode_records, encode_responses
from zeda_megatron.training.tokenizers import cfg_get

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---- samples ---------------------------------------------------------------------------------------
def sample_from_document(ids, mask, seq_length: int, pad_id: int, prompt_length: int = 0) -> dict:
    """The padded sample of one document (``ids``/``mask`` at most ``S+1`` long; see the module doc)."""
    ids = torch.as_tensor(np.asarray(ids[: seq_length + 1], dtype=np.int64))
    mask = torch.as_tensor(np.asarray(mask[: seq_length + 1], dtype=bool))
    n = ids.numel()
    k = min(n, seq_length)
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    tokens[:k] = ids[:k]
    if n > 1:
        labels[: n - 1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    padding = torch.ones(seq_length, dtype=torch.bool)
    padding[:k] = False
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
        "padding_mask": padding,
        "prompt_length": torch.tensor(min(prompt_length, seq_length), dtype=torch.long),
    }


def make_sample(prompt_ids: list[int], target_ids: list[int], seq_length: int, pad_id: int) -> dict | None:
    """The padded sample of ``prompt_ids + target_ids`` (loss on ``target_ids``); None when the
    truncation to ``seq_length`` leaves no trained token."""
    ids = list(prompt_ids) + list(target_ids)
    first = max(len(prompt_ids), 1)
    if first >= min(len(ids), seq_length + 1):
        return None
    mask = [i >= first for i in range(len(ids))]
    return sample_from_document(ids, mask, seq_length, pad_id, len(prompt_ids))


def prompt_sample(ids, seq_length: int, pad_id: int) -> dict:
    """A stage-2 prompt (already cut to fit) left-aligned in ``seq_length`` positions."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    tokens[: ids.numel()] = ids
    padding = torch.ones(seq_length, dtype=torch.bool)
    padding[: ids.numel()] = False
    return {
        "tokens": tokens,
        "labels": torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long),
        "loss_mask": torch.zeros(seq_length),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
        "padding_mask": padding,
        "prompt_length": torch.tensor(ids.numel(), dtype=torch.long),
    }


def cut_prompt(ids, seq_length: int, max_new_tokens: int):
    """Keep the last ``seq_length - max_new_tokens`` ids of a prompt."""
    room = seq_length - max_new_tokens
    return ids[len(ids) - room:] if len(ids) > room else ids


# ---- stage 1: documents ----------------------------------------------------------------------------
class DocumentDataset:
    """Base of the stage-1 datasets (see the module doc). Subclasses set ``seq_length``, ``pad_id``,
    ``format``, ``path`` and implement ``__len__``, ``document(i)`` and ``raw_lengths()``."""

    seq_length: int
    pad_id: int
    format: str
    path: str | None
    packing: bool = False  # set by build_dataset from data.packing; read by batching.iterate_batches

    def __len__(self) -> int:
        raise NotImplementedError

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64, mask bool)`` of document ``i``, at most ``seq_length + 1`` long."""
        raise NotImplementedError

    def raw_lengths(self) -> np.ndarray:
        """Number of ids of every document (before the cut to ``seq_length + 1``)."""
        raise NotImplementedError

    def positions(self) -> np.ndarray:
        """Sequence positions each document takes when packed: ``min(n, S+1) - 1`` (a document's last
        id is only a label)."""
        cached = getattr(self, "_positions", None)
        if cached is None:
            cached = (np.minimum(self.raw_lengths(), self.seq_length + 1) - 1).astype(np.int32)
            self._positions = cached
        return cached

    def prompt_length(self, i: int, first: int) -> int:
        return 0 if self.format == "text" else first

    def __getitem__(self, i: int) -> dict:
        ids, mask = self.document(i)
        first = int(np.argmax(mask)) if mask.any() else len(mask)
        return sample_from_document(ids, mask, self.seq_length, self.pad_id, self.prompt_length(i, first))

    @property
    def samples(self) -> list[dict]:
        return [self[i] for i in range(len(self))]


def _trainable(first: np.ndarray, lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Documents with a trained id within the first ``S+1`` ids (and a predecessor to predict it from)."""
    return (first >= 1) & (first < np.minimum(lengths, seq_length + 1))


class InMemoryDocuments(DocumentDataset):
    """Documents held as int32 tensors (cut to ``S+1`` ids) with their first trained index."""

    def _set_records(self, docs, total: int) -> None:
        self.records = []
        self._lengths = []
        for ids, first in docs:
            if first >= 1 and first < min(len(ids), self.seq_length + 1):
                self.records.append((torch.tensor(ids[: self.seq_length + 1], dtype=torch.int32), first))
                self._lengths.append(len(ids))
        self.dropped = total - len(self.records)
        if self.dropped:
            log.warning("%s: %d of %d samples have no trained token within seq_length=%d and are skipped",
                        self.path, self.dropped, total, self.seq_length)
        if not self.records:
            raise ValueError(
                f"{self.path}: no sample keeps a trained token within trainer.seq_length={self.seq_length} "
                "(prompts too long); raise trainer.seq_length"
            )
        self._lengths = np.asarray(self._lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def raw_lengths(self) -> np.ndarray:
        return self._lengths

    def document(self, i: int):
        ids, first = self.records[i]
        ids = ids.numpy().astype(np.int64)
        mask = np.arange(len(ids)) >= first
        return ids, mask


class JsonlDataset(InMemoryDocuments):
    """Stage 1 from a JSONL file, tokenised in memory: prompt/response pairs (loss on the response +
    EOS) or plain text (all tokens but the first). For large files use :class:`PreparedDataset`."""

    def __init__(self, path: str, tokenizer, seq_length: int, fmt: str = "auto", chat_template: bool = False):
        rows, self.format = read_jsonl(path, fmt, need="train")
        self.path, self.seq_length, self.pad_id = path, seq_length, tokenizer.pad_id
        self.text = self.format == "text"
        self._set_records(encode_records(tokenizer, rows, self.format, chat_template), len(rows))


class PreparedDataset(DocumentDataset):
    """Stage 1 from a prepared prefix, memory-mapped (a rank reads only the documents it uses)."""

    def __init__(self, prefix: str, tokenizer, seq_length: int, chat_template: bool | None = None):
        self.data = PreparedData(prefix, tokenizer, chat_template)
        self.path, self.format = str(prefix), self.data.format
        if self.format not in ("prompt_response", "text"):
            raise ValueError(f"{prefix}: prepared as {self.format!r} (prompts only): nothing to train on in stage=sft")
        self.seq_length, self.pad_id = int(seq_length), tokenizer.pad_id
        ok = _trainable(self.data.first, self.data.lengths, self.seq_length)
        self.index = None if ok.all() else np.flatnonzero(ok)
        self.dropped = len(ok) - (len(ok) if self.index is None else len(self.index))
        if self.dropped:
            log.warning("%s: %d of %d samples have no trained token within seq_length=%d and are skipped",
                        prefix, self.dropped, len(ok), self.seq_length)
        if len(self) == 0:
            raise ValueError(f"{prefix}: no sample keeps a trained token within trainer.seq_length={seq_length} "
                             "(prompts too long); raise trainer.seq_length")

    def _doc(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return int(i) if self.index is None else int(self.index[i])

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)

    def raw_lengths(self) -> np.ndarray:
        lengths = self.data.lengths
        return lengths if self.index is None else lengths[self.index]

    def document(self, i: int):
        d = self._doc(i)
        n = self.seq_length + 1
        return self.data.ids(d, n).astype(np.int64), self.data.mask(d, n).astype(bool)


# ---- stage 2: prompts ------------------------------------------------------------------------------
class PromptDataset:
    """Stage 2 prompts from a JSONL file (tokenised in memory), left-aligned and padded to ``S``; the
    last ``max_new_tokens`` positions are room for the response."""

    def __init__(self, path: str, tokenizer, seq_length: int, max_new_tokens: int, fmt: str = "auto",
                 chat_template: bool = False):
        _check_room(seq_length, max_new_tokens)
        rows, self.format = read_jsonl(path, fmt, need="prompt")
        self.path, self.seq_length, self.pad_id = path, seq_length, tokenizer.pad_id
        self.records = [torch.tensor(cut_prompt(ids, seq_length, max_new_tokens), dtype=torch.int32)
                        for ids in encode_prompts(tokenizer, [r["prompt"] for r in rows], chat_template)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return prompt_sample(self.records[i], self.seq_length, self.pad_id)

    @property
    def samples(self) -> list[dict]:
        return [self[i] for i in range(len(self))]


class PreparedPromptDataset(PromptDataset):
    """Stage 2 prompts from a prepared prefix (prompt or prompt/response data: the prompt part),
    memory-mapped."""

    def __init__(self, prefix: str, tokenizer, seq_length: int, max_new_tokens: int,
                 chat_template: bool | None = None):
        _check_room(seq_length, max_new_tokens)
        self.data = PreparedData(prefix, tokenizer, chat_template)
        self.path, self.format = str(prefix), self.data.format
        if self.format == "text":
            raise ValueError(f"{prefix}: prepared as text: no prompts for stage=opd; use prompt lines")
        self.seq_length, self.max_new_tokens, self.pad_id = int(seq_length), int(max_new_tokens), tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = self.data.ids(i, int(self.data.first[i]))
        return prompt_sample(cut_prompt(ids, self.seq_length, self.max_new_tokens), self.seq_length, self.pad_id)


def _check_room(seq_length: int, max_new_tokens: int) -> None:
    if max_new_tokens >= seq_length:
        raise ValueError(
            f"stage.max_new_tokens={max_new_tokens} leaves no room for a prompt in trainer.seq_length={seq_length}"
        )


# ---- built-in corpus ---------------------------------------------------------------------------------
class SyntheticDataset(InMemoryDocuments):
    """A deterministic, learnable prompt/response corpus for tiny random-init models (no files).

    Prompts are short counting / copying / reversing tasks over small words; responses are their
    answers, so a model learns them within a few dozen steps. With ``stage="opd"`` only the prompts.
    """

    WORDS = ("red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "star", "rock", "milk", "rain")

    def __init__(self, tokenizer, seq_length: int, num_samples: int = 512, seed: int = 0,
                 stage: str = "sft", max_new_tokens: int = 32):
        gen = torch.Generator().manual_seed(seed)
        self.path, self.format, self.seq_length, self.pad_id = None, "prompt_response", seq_length, tokenizer.pad_id
        self.prompts_only = stage == "opd"
        pairs = [self._pair(gen) for _ in range(num_samples)]
        prompts = encode_prompts(tokenizer, [p for p, _ in pairs])
        if self.prompts_only:
            self.records = [torch.tensor(cut_prompt(ids, seq_length, max_new_tokens), dtype=torch.int32)
                            for ids in prompts]
            return
        responses = encode_responses(tokenizer, [r for _, r in pairs])
        self.path = "synthetic corpus"
        try:
            self._set_records([(p + r, max(len(p), 1)) for p, r in zip(prompts, responses)], num_samples)
        except ValueError:
            raise ValueError(f"trainer.seq_length={seq_length} is too short for the synthetic corpus") from None

    def __getitem__(self, i: int) -> dict:
        if self.prompts_only:
            return prompt_sample(self.records[i], self.seq_length, self.pad_id)
        return super().__getitem__(i)

    @classmethod
    def _pair(cls, gen) -> tuple[str, str]:
        kind = int(torch.randint(3, (1,), generator=gen))
        if kind == 0:
            start = int(torch.randint(0, 90, (1,), generator=gen))
            return f"count from {start}:", " " + " ".join(str(start + i) for i in range(1, 5))
        words = [cls.WORDS[int(i)] for i in torch.randint(len(cls.WORDS), (3,), generator=gen)]
        if kind == 1:
            return f"copy {' '.join(words)}:", " " + " ".join(words)
        return f"reverse {' '.join(words)}:", " " + " ".join(reversed(words))


# ---- from the config -------------------------------------------------------------------------------
def data_source_exists(path) -> bool:
    """Whether ``data.path`` names a JSONL file or a prepared prefix."""
    return path is not None and (os.path.isfile(str(path)) or is_prepared(str(path)))


def prepared_prefix(path: str, tokenizer, fmt: str = "auto", chat_template: bool = False, stage: str = "sft",
                    cache_dir: str | None = None) -> str:
    """The prepared prefix for ``data.path``: itself when it is one; for a JSONL file, its cached
    preparation (written now when missing or out of date, once across ranks)."""
    path = str(path)
    if is_prepared(path):
        return path
    from zeda_megatron.training.jsonl import iter_jsonl

    need = "prompt" if stage == "opd" else "train"
    resolved, _ = iter_jsonl(path, fmt, need)
    prefix = default_prefix(path, tokenizer, resolved, chat_template, cache_dir)
    try:
        prepare(path, tokenizer, prefix, resolved, chat_template, need=need)
    except OSError as e:
        raise ValueError(f"could not prepare {path} into {prefix} ({e}); set data.cache_dir to a writable folder "
                         "or run python -m zeda_megatron.prepare_data ... out=PREFIX and train with data.path=PREFIX"
                         ) from e
    return prefix


def build_dataset(cfg, tokenizer):
    """The training dataset of the composed config for its stage: data.path, or the synthetic corpus
    when it is null. Stage-1 datasets carry ``packing`` (``data.packing``), which
    :func:`.batching.iterate_batches` follows."""
    stage = cfg.stage.name
    path = cfg.data.path
    seq = int(cfg.trainer.seq_length)
    chat = bool(cfg_get(cfg.data, "chat_template", False))
    if path is None:
        ds = SyntheticDataset(tokenizer, seq, int(cfg_get(cfg.data, "synthetic_samples", 512)),
                              seed=int(cfg.seed), stage=stage, max_new_tokens=int(cfg.stage.max_new_tokens))
    else:
        prefix = prepared_prefix(str(path), tokenizer, cfg_get(cfg.data, "format", "auto"), chat, stage,
                                 cfg_get(cfg.data, "cache_dir"))
        if stage == "opd":
            return PreparedPromptDataset(prefix, tokenizer, seq, int(cfg.stage.max_new_tokens), chat)
        ds = PreparedDataset(prefix, tokenizer, seq, chat)
    if stage != "opd":
        ds.packing = bool(cfg_get(cfg.data, "packing", False))
    return ds
