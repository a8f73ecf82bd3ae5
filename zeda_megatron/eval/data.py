"""The held-out evaluation sets: stdlib code chunks no model here trained on (tokenised, each token
with its class) and arithmetic problems (greedy exact match)."""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_CLASSES = ("code_punctuation", "identifiers_keywords", "digits", "whitespace", "prose_other")


@dataclass
class EvalData:
    ids: list[list[int]]              # per chunk: bos + tokens
    classes: list[list[str]]          # per token (position 0 = bos)
    problems: list[dict]              # {"prompt", "answer", "op"}
    n_tokens: int = 0                 # scored tokens (bos excluded)


def char_class(text: str, prose: list[bool], a: int, b: int) -> str:
    """The class of the token spanning ``text[a:b]`` (``prose``: per char, inside a comment/string)."""
    s = text[a:b]
    if not s.strip():
        return "whitespace"
    core = s.strip()
    if core.isdigit():
        return "digits"
    if any(prose[a:b]):
        return "prose_other"
    if not any(ch.isalnum() or ch == "_" for ch in core):
        return "code_punctuation"
    if all(ch.isalnum() or ch == "_" for ch in core):
        return "identifiers_keywords"
    return "prose_other"


def encode_chunk(tok, text: str, max_len: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(bos + token ids, character offsets of the tokens) of ``text``, at most ``max_len`` ids."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tok.bos_token_id] + list(enc["input_ids"])[: max_len - 1]
    return ids, [tuple(o) for o in enc["offset_mapping"]][: max_len - 1]


def eval_data(tok, seed: int = 0, n_chunks: int = 48, chunk_chars: int = 600, max_len: int = 256,
              n_arith: int = 500) -> EvalData:
    """``n_chunks`` held-out code chunks and ``n_arith`` arithmetic problems of the embedded corpus."""
    from zeda_megatron.embedded import corpus

    ids, classes = [], []
    for r in corpus.heldout_code_records(seed, n_chunks, chunk_chars):
        x, offs = encode_chunk(tok, r["text"], max_len)
        ids.append(x)
        classes.append(["whitespace"] + [char_class(r["text"], r["prose_mask"], a, b) for a, b in offs])
    problems = corpus.arithmetic_problems(n_arith, seed)
    return EvalData(ids, classes, problems, sum(len(x) - 1 for x in ids))
