"""Data for the distillation trainer: tokenizer, JSONL datasets, a deterministic resumable iterator.

* :func:`load_tokenizer` gives the HF tokenizer of ``model.hf_dir`` or, for randomly initialised
  models, :class:`ByteTokenizer` (256 bytes + specials; needs ``vocab_size >= 260``).
* :class:`JsonlDataset` (stage 1): ``{"prompt", "response"}`` lines (loss on the response tokens and
  the closing EOS) or ``{"text"}`` lines (loss on every token); the format is detected per file from
  its first line, or forced.
* :class:`PromptDataset` (stage 2): ``{"prompt"}`` lines, or prompt/response lines of which only the
  prompt is used; prompts are cut to ``seq_length - max_new_tokens`` tokens (keeping their end, where
  the question and the generation prompt are).
* :class:`SyntheticDataset`: a built-in learnable prompt/response corpus for tiny random models
  (``data.path: null``); a real model must be given data.

Every sample is a dict of tensors of length ``S = seq_length``: ``tokens`` (input ids, padded with the
pad id), ``labels`` (the next token where the loss is taken, -100 elsewhere: megatron-style shifted
labels, so ``labels[i]`` is predicted from ``tokens[:i+1]``), ``loss_mask`` (float, 1 where trained),
``position_ids`` and ``prompt_length`` (number of prompt tokens at the start; 0 for text).

Files are checked completely before anything is tokenised: a missing or empty file, a line that is
not JSON, or a line without the needed field raises a :class:`ValueError` naming the file, the line
number and the key.

:func:`iterate_batches` walks a fixed sample order (a seeded permutation per epoch): step ``t`` uses the
global samples ``[t*G, (t+1)*G)`` with ``G = micro_batch_size * num_microbatches * dp_size``, so the data
of a step depends only on ``(seed, step)``: a run resumed at step ``t`` sees what an uninterrupted run
would, and every data-parallel layout with the same global batch sees the same global batch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("auto", "prompt_response", "text", "prompt")
_FIELDS = {"prompt_response": ("prompt", "response"), "text": ("text",), "prompt": ("prompt",)}


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ---- tokenizers -------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad (256), bos (257), eos (258), unk (259)."""

    NUM_SPECIAL = 4

    def __init__(self, vocab_size: int = 260):
        if vocab_size < 256 + self.NUM_SPECIAL:
            raise ValueError(
                f"the built-in byte tokenizer needs vocab_size >= {256 + self.NUM_SPECIAL}, got {vocab_size}; "
                "raise model.hf_config.vocab_size or set model.hf_dir to a model with its own tokenizer"
            )
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 256, 257, 258, 259
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, prompt: str) -> str:
        return prompt


class HFTokenizer:
    """The same interface over a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer of {tok.name_or_path!r} has no eos_token; cannot end responses")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.bos_id = tok.bos_token_id
        self.chat_template = getattr(tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Batched encoding (parallel in the Rust tokenizers of fast HF tokenizers)."""
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )


def load_tokenizer(model_cfg):
    """HF AutoTokenizer from ``model.hf_dir`` when set, else :class:`ByteTokenizer` sized to the model."""
    hf_dir = _get(model_cfg, "hf_dir")
    hf_config = _get(model_cfg, "hf_config") or {}
    vocab = _get(hf_config, "vocab_size")
    if hf_dir:
        from transformers import AutoTokenizer

        cfg_path = os.path.join(str(hf_dir), "config.json")
        hf_cfg = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                hf_cfg = json.load(f)
            vocab = hf_cfg.get("vocab_size", vocab)
        try:
            # a PlusPlus export (our own modeling code, auto_map) would otherwise ask interactively
            tok = HFTokenizer(AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code="auto_map" in hf_cfg))
        except (OSError, ValueError) as e:
            raise ValueError(f"model.hf_dir={hf_dir!r}: could not load its tokenizer ({e})") from e
        if vocab is not None and tok.vocab_size > int(vocab):
            raise ValueError(
                f"tokenizer of model.hf_dir={hf_dir!r} has {tok.vocab_size} tokens but the model's "
                f"vocab_size is {vocab}"
            )
        return tok
    return ByteTokenizer(int(vocab) if vocab is not None else 260)


# ---- reading and checking JSONL ----------------------------------------------------------------------
def read_jsonl(path: str, fmt: str = "auto", need: str = "train") -> tuple[list[dict], str]:
    """Read and check every line of ``path``; returns (records, resolved format).

    ``need``: "train" (stage 1: prompt_response or text) or "prompt" (stage 2: a prompt per line).
    """
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is unknown; use one of {list(FORMATS)}")
    if path is None or not os.path.isfile(str(path)):
        raise ValueError(f"data file {path!r} does not exist (data.path / data.eval_path)")
    records: list[dict] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno} is a JSON {type(rec).__name__}, expected an object")
            records.append((lineno, rec))
    if not records:
        raise ValueError(f"{path}: the file is empty (no JSON lines)")
    if fmt == "auto":
        first_line, first = records[0]
        if need == "prompt":
            fmt = "prompt"
        elif "prompt" in first and "response" in first:
            fmt = "prompt_response"
        elif "text" in first:
            fmt = "text"
        else:
            missing = "response" if "prompt" in first else "text"
            raise ValueError(
                f"{path}: line {first_line} has neither 'prompt'+'response' nor 'text' (missing key "
                f"{missing!r}); stage 1 needs {{\"prompt\", \"response\"}} or {{\"text\"}} lines"
            )
    if need == "train" and fmt == "prompt":
        raise ValueError(
            f"data.format=prompt gives no tokens to train on in stage=sft ({path}); use prompt_response or text"
        )
    if need == "prompt" and fmt == "text":
        raise ValueError(f"data.format=text has no prompts for stage=opd ({path}); use prompt lines")
    fields = _FIELDS[fmt] if need == "train" else ("prompt",)
    out = []
    for lineno, rec in records:
        for key in fields:
            if key not in rec:
                raise ValueError(f"{path}: line {lineno} has no {key!r} key (format {fmt}, needs {list(fields)})")
            if not isinstance(rec[key], str):
                raise ValueError(
                    f"{path}: line {lineno}: {key!r} must be a string, got {type(rec[key]).__name__}"
                )
        out.append({k: rec[k] for k in fields})
    return out, fmt


def check_data_file(path: str, fmt: str = "auto", stage: str = "sft") -> str:
    """Check a data file for ``stage`` without tokenising; returns the resolved format."""
    return read_jsonl(path, fmt, need="prompt" if stage == "opd" else "train")[1]


# ---- samples ---------------------------------------------------------------------------------------
def _bos(tokenizer) -> list[int]:
    """The built-in tokenizer starts every sequence with BOS; HF tokenizers follow their chat template."""
    return [tokenizer.bos_id] if isinstance(tokenizer, ByteTokenizer) else []


def make_sample(prompt_ids: list[int], target_ids: list[int], seq_length: int, pad_id: int) -> dict | None:
    """Pack ``prompt_ids + target_ids`` into ``seq_length`` tokens; loss on ``target_ids``.

    Returns None when truncation leaves no trained token.
    """
    rec = _pack(prompt_ids, target_ids, seq_length)
    return None if rec is None else _expand(rec, seq_length, pad_id)


def _pack(prompt_ids, target_ids, seq_length):
    """Compact form: (ids[:S+1] as int32, number of prompt ids kept) or None if nothing is trained."""
    ids = (list(prompt_ids) + list(target_ids))[: seq_length + 1]
    n_prompt = min(len(prompt_ids), len(ids))
    if len(ids) - max(n_prompt, 1) < 1:
        return None
    return torch.tensor(ids, dtype=torch.int32), n_prompt


def _expand(rec, seq_length: int, pad_id: int) -> dict:
    ids, n_prompt = rec
    n = ids.numel()
    ids = ids.long()
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    tokens[: min(n, seq_length)] = ids[:seq_length]
    # position i predicts ids[i+1]; trained where ids[i+1] is a target (not a prompt) token
    first = max(n_prompt, 1) - 1
    labels[first: n - 1] = ids[first + 1: n]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
        "prompt_length": torch.tensor(min(n_prompt, seq_length), dtype=torch.long),
    }


class _PackedDataset:
    """Samples kept as int32 id tensors (at most S+1 ids each); tensors of length S built on access."""

    records: list
    seq_length: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return _expand(self.records[i], self.seq_length, self.pad_id)

    @property
    def samples(self) -> list[dict]:
        return [self[i] for i in range(len(self))]


class JsonlDataset(_PackedDataset):
    """Stage 1 data: prompt/response pairs (loss on the response + EOS) or plain text (all tokens but
    the first)."""

    def __init__(self, path: str, tokenizer, seq_length: int, fmt: str = "auto", chat_template: bool = False):
        rows, self.format = read_jsonl(path, fmt, need="train")
        self.path, self.seq_length, self.pad_id = path, seq_length, tokenizer.pad_id
        bos, eos = _bos(tokenizer), [tokenizer.eos_id]
        self.records, self.dropped = [], 0
        if self.format == "text":
            seqs = [bos + ids + eos for ids in tokenizer.encode_batch([r["text"] for r in rows])]
            pairs = [(t[:1], t[1:]) for t in seqs]  # every token but the first is predicted
            text = True
        else:
            prompts = [tokenizer.apply_chat_template(r["prompt"]) if chat_template else r["prompt"] for r in rows]
            pairs = zip((bos + p for p in tokenizer.encode_batch(prompts)),
                        (r + eos for r in tokenizer.encode_batch([r["response"] for r in rows])))
            text = False
        for prompt_ids, target_ids in pairs:
            rec = _pack(prompt_ids, target_ids, seq_length)
            if rec is None:
                self.dropped += 1
            else:
                self.records.append(rec)
        self.text = text
        if self.dropped:
            log.warning("%s: %d of %d samples have no response token within seq_length=%d and are skipped",
                        path, self.dropped, len(rows), seq_length)
        if not self.records:
            raise ValueError(
                f"{path}: no sample keeps a trained token within trainer.seq_length={seq_length} "
                "(prompts too long); raise trainer.seq_length"
            )

    def __getitem__(self, i: int) -> dict:
        out = super().__getitem__(i)
        if self.text:
            out["prompt_length"].zero_()
        return out


def _prompt_record(ids: list[int], seq_length: int, max_new_tokens: int):
    room = seq_length - max_new_tokens
    if len(ids) > room:
        ids = ids[len(ids) - room:]  # keep the end: the question and the generation prompt
    return torch.tensor(ids, dtype=torch.int32)


def _expand_prompt(ids: torch.Tensor, seq_length: int, pad_id: int) -> dict:
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    tokens[: ids.numel()] = ids.long()
    return {
        "tokens": tokens,
        "labels": torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long),
        "loss_mask": torch.zeros(seq_length),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
        "prompt_length": torch.tensor(ids.numel(), dtype=torch.long),
    }


class PromptDataset(_PackedDataset):
    """Stage 2 prompts, left-aligned and padded to ``seq_length``; the last ``max_new_tokens``
    positions are room for the response. ``labels`` are all -100 and ``loss_mask`` zero until the
    trainer fills them from the student's samples."""

    def __init__(self, path: str, tokenizer, seq_length: int, max_new_tokens: int, fmt: str = "auto",
                 chat_template: bool = False):
        if max_new_tokens >= seq_length:
            raise ValueError(
                f"stage.max_new_tokens={max_new_tokens} leaves no room for a prompt in trainer.seq_length={seq_length}"
            )
        rows, self.format = read_jsonl(path, fmt, need="prompt")
        self.path, self.seq_length, self.pad_id = path, seq_length, tokenizer.pad_id
        prompts = [tokenizer.apply_chat_template(r["prompt"]) if chat_template else r["prompt"] for r in rows]
        bos = _bos(tokenizer)
        self.records = [_prompt_record(bos + ids, seq_length, max_new_tokens) for ids in tokenizer.encode_batch(prompts)]

    def __getitem__(self, i: int) -> dict:
        return _expand_prompt(self.records[i], self.seq_length, self.pad_id)


class SyntheticDataset(_PackedDataset):
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
        bos, eos = _bos(tokenizer), [tokenizer.eos_id]
        self.records = []
        for _ in range(num_samples):
            prompt, response = self._pair(gen)
            if self.prompts_only:
                self.records.append(_prompt_record(bos + tokenizer.encode(prompt), seq_length, max_new_tokens))
                continue
            rec = _pack(bos + tokenizer.encode(prompt), tokenizer.encode(response) + eos, seq_length)
            if rec is not None:
                self.records.append(rec)
        if not self.records:
            raise ValueError(f"trainer.seq_length={seq_length} is too short for the synthetic corpus")

    def __getitem__(self, i: int) -> dict:
        if self.prompts_only:
            return _expand_prompt(self.records[i], self.seq_length, self.pad_id)
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


def build_dataset(cfg, tokenizer, split: str = "train"):
    """The dataset of the composed config for its stage: data.path (train) or data.eval_path (eval);
    the synthetic corpus when data.path is null (train) — None for a null eval path."""
    stage = cfg.stage.name
    path = cfg.data.path if split == "train" else cfg.data.eval_path
    seq = int(cfg.trainer.seq_length)
    chat = bool(_get(cfg.data, "chat_template", False))
    if path is None:
        if split != "train":
            return None
        return SyntheticDataset(tokenizer, seq, int(_get(cfg.data, "synthetic_samples", 512)),
                                seed=int(cfg.seed), stage=stage, max_new_tokens=int(cfg.stage.max_new_tokens))
    if stage == "opd":
        return PromptDataset(str(path), tokenizer, seq, int(cfg.stage.max_new_tokens), cfg.data.format, chat)
    return JsonlDataset(str(path), tokenizer, seq, cfg.data.format, chat)


# ---- deterministic, resumable batches -----------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=gen)


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices of the global samples ``[start, start+count)`` of the seeded order."""
    out = []
    for g in range(start, start + count):
        epoch, pos = divmod(g, n)
        out.append(int(_epoch_order(n, seed, epoch)[pos]))
    return out


def prompts_of(batch: dict, repeat: int = 1) -> list[list[int]]:
    """The prompt token ids of a (prompt) micro-batch, each repeated ``repeat`` times in a row
    (``stage.samples_per_prompt``), ready for :func:`zeda_megatron.training.opd.sample`."""
    out = []
    for row, n in zip(batch["tokens"], batch["prompt_length"]):
        out.extend([row[: int(n)].tolist()] * repeat)
    return out


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def step_indices(n: int, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int,
                 seed: int, step: int) -> list[list[int]]:
    """Dataset indices of this DP rank's micro-batches at ``step`` (0-based).

    The step's global batch is contiguous in the seeded order; DP rank r takes the r-th contiguous
    slice of it and splits that into micro-batches.
    """
    per_rank = micro_batch_size * num_microbatches
    g0 = step * per_rank * dp_size + dp_rank * per_rank
    idx = sample_indices(n, seed, g0, per_rank)
    return [idx[m * micro_batch_size:(m + 1) * micro_batch_size] for m in range(num_microbatches)]


def iterate_batches(dataset, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int,
                    seed: int, start_step: int = 0, max_steps: int | None = None) -> Iterator[list[dict]]:
    """Yield, for steps ``start_step, start_step+1, ...`` (until ``max_steps`` if given), the list of
    this DP rank's ``num_microbatches`` micro-batches, each a dict of tensors ``[micro_batch_size, ...]``.

    The data of a step depends only on (seed, step, layout): resuming at ``start_step`` reproduces
    an uninterrupted run. Epochs reshuffle with a per-epoch seeded permutation.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} out of range for dp_size={dp_size}")
    if micro_batch_size < 1 or num_microbatches < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} and num_microbatches={num_microbatches} must be >= 1")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    step = int(start_step)
    while max_steps is None or step < max_steps:
        yield [collate([dataset[i] for i in mb])
               for mb in step_indices(n, micro_batch_size, num_microbatches, dp_rank, dp_size, seed, step)]
        step += 1
