"""The one place where prompts, responses and texts become token ids.

Generation (``zeda_megatron.generate``), data preparation (``zeda_megatron.prepare_data``), training
(stage-1 samples, stage-2 prompts) and evaluation all call these functions, so a prompt is the same
ids everywhere (tests/test_data_template.py pins it).

Rules:

* **prompt** -> ``encode(text)`` where ``text`` is the prompt itself (BOS in front, below), or with
  ``chat_template=True`` the prompt as one user turn of the tokenizer's chat template with the
  generation prompt appended (``apply_chat_template(..., add_generation_prompt=True)``, the way
  Qwen3/GLM chat models are prompted). The released-model presets turn it on
  (``model.chat_template: true`` -> ``data.chat_template``); tiny and embedded models keep plain prompts.
* **BOS**: a chat-templated prompt is exactly the template's text, encoded without added special
  tokens (what ``apply_chat_template(tokenize=True)`` gives: the template renders whatever prefix the
  model expects, e.g. GLM's ``[gMASK]<sop>``, Llama 3's ``<|begin_of_text|>``, nothing for Qwen3). A
  plain prompt (and a text) gets the tokenizer's BOS in front when it defines one (the byte tokenizer
  and the embedded BPE tokenizer do; the word-level test tokenizer does not).
* **response** -> ``encode(response) + EOS`` (encoded on its own, as a generated continuation is).
* **text** -> ``BOS? + encode(text) + EOS``; every token but the first is trained.

All functions take our tokenizer (:mod:`.tokenizers`) or a transformers tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from zeda_megatron.training.tokenizers import as_tokenizer


def prompt_text(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt's text as the model sees it (chat-templated or as is)."""
    tok = as_tokenizer(tokenizer)
    return tok.apply_chat_template(prompt) if chat_template else prompt


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = as_tokenizer(tokenizer).bos_id
    if bos is None or (ids and ids[0] == bos):
        return list(ids)
    return [bos] + list(ids)


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of each prompt (template + BOS per the module's rules)."""
    tok = as_tokenizer(tokenizer)
    texts = [prompt_text(tok, p, chat_template) for p in prompts]
    ids = tok.encode_batch(texts)
    return ids if chat_template else [with_bos(tok, x) for x in ids]


def encode_responses(tokenizer, responses: Sequence[str]) -> list[list[int]]:
    """``encode(response) + [EOS]`` for each response."""
    tok = as_tokenizer(tokenizer)
    return [ids + [tok.eos_id] for ids in tok.encode_batch(list(responses))]


def encode_texts(tokenizer, texts: Sequence[str], eos: bool = True) -> list[list[int]]:
    """``BOS? + encode(text) (+ EOS)`` for each text."""
    tok = as_tokenizer(tokenizer)
    end = [tok.eos_id] if eos else []
    return [with_bos(tok, ids) + end for ids in tok.encode_batch(list(texts))]


def encode_records(tokenizer, records: Sequence[dict], fmt: str, chat_template: bool = False
                   ) -> list[tuple[list[int], int]]:
    """Training documents of checked JSONL records: ``(ids, first_target)`` per record, where
    ``ids[first_target:]`` are the trained tokens (each predicted from the ids before it).

    ``fmt``: ``prompt_response`` (trained: the response and its EOS), ``text`` (all but the first
    token) or ``prompt`` (nothing trained: ``first_target == len(ids)``; stage-2 prompts).
    """
    tok = as_tokenizer(tokenizer)
    if fmt == "text":
        return [(ids, 1) for ids in encode_texts(tok, [r["text"] for r in records])]
    prompts = encode_prompts(tok, [r["prompt"] for r in records], chat_template)
    if fmt == "prompt":
        return [(ids, len(ids)) for ids in prompts]
    if fmt != "prompt_response":
        raise ValueError(f"unknown format {fmt!r}")
    responses = encode_responses(tok, [r["response"] for r in records])
    return [(p + r, max(len(p), 1)) for p, r in zip(prompts, responses)]
