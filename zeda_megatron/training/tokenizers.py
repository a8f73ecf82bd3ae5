"""Tokenizers of the trainer: the model's Hugging Face tokenizer, or a byte tokenizer for random models.

* :class:`HFTokenizer` wraps a ``transformers`` tokenizer (``model.hf_dir``);
* :class:`ByteTokenizer` (256 bytes + pad/bos/eos/unk; needs ``vocab_size >= 260``) serves the tiny
  randomly initialised models, which have no tokenizer files.

Both expose ``encode`` / ``encode_batch`` (no special tokens added), ``decode``, ``pad_id``, ``bos_id``
(None when the tokenizer has no BOS), ``eos_id``, ``vocab_size``, ``chat_template`` and
:meth:`fingerprint` (what prepared data is keyed on). How a prompt, response or text becomes ids
(template, BOS, EOS) is decided in one place: :mod:`zeda_megatron.training.templates`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import torch


def _field(cfg, key, default=None):
    """``cfg[key]`` for dicts, DictConfigs and objects (a ModelSpec); ``default`` when absent (or ``cfg`` is None)."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad (256), bos (257), eos (258), unk (259)."""

    NUM_BYTES = 256
    NUM_SPECIAL = 4  # pad, bos, eos, unk
    MIN_VOCAB = NUM_BYTES + NUM_SPECIAL

    def __init__(self, vocab_size: int = MIN_VOCAB):
        if vocab_size < self.MIN_VOCAB:
            raise ValueError(
                f"the built-in byte tokenizer needs vocab_size >= {self.MIN_VOCAB}, got {vocab_size}; "
                "raise model.hf_config.vocab_size or set model.hf_dir to a model with its own tokenizer"
            )
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(self.NUM_BYTES, self.MIN_VOCAB)
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(i for i in ids if 0 <= i < self.NUM_BYTES).decode("utf-8", errors="replace")

    def apply_chat_template(self, prompt: str) -> str:
        raise ValueError("the built-in byte tokenizer has no chat template; set data.chat_template=false")

    def fingerprint(self) -> str:
        return f"byte-v1-{self.vocab_size}"


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
        return [list(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, prompt: str) -> str:
        """``prompt`` as one user turn of the tokenizer's chat template, ending with the generation prompt."""
        if not self.chat_template:
            raise ValueError(
                f"data.chat_template is on but the tokenizer of {self.tok.name_or_path!r} has no chat template; "
                "set data.chat_template=false (plain prompts) or use the model's own tokenizer files"
            )
        return self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def fingerprint(self) -> str:
        """Digest of the vocabulary, merges, special tokens and chat template (computed once)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(self.tok.get_vocab().items())).encode())
        h.update(json.dumps([self.bos_id, self.eos_id, self.pad_id, self.vocab_size,
                             self.chat_template or ""]).encode())
        self._fingerprint = "hf-" + h.hexdigest()[:24]
        return self._fingerprint


def as_tokenizer(tok):
    """Our tokenizer interface for ``tok``: returned as is when it already has it, wrapped when it is
    a transformers tokenizer (so generation/evaluation code may hand either)."""
    if isinstance(tok, (ByteTokenizer, HFTokenizer)) or hasattr(tok, "encode_batch"):
        return tok
    return HFTokenizer(tok)


def load_tokenizer(model):
    """HF AutoTokenizer from ``model.hf_dir`` when set, else :class:`ByteTokenizer` sized to the model.
    ``model``: the run's :class:`~zeda_megatron.spec.ModelSpec` (or a mapping with ``hf_dir`` and
    ``hf_config``, as generation hands an exported folder)."""
    hf_dir = _field(model, "hf_dir")
    hf_config = _field(model, "hf_config") or {}
    vocab = _field(hf_config, "vocab_size")
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
    return ByteTokenizer(int(vocab) if vocab is not None else ByteTokenizer.MIN_VOCAB)
