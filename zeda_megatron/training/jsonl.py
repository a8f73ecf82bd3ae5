"""Reading and checking JSONL data files (streamed: a file is never held in memory whole).

Formats: ``prompt_response`` (``{"prompt", "response"}`` lines), ``text`` (``{"text"}``) and
``prompt`` (``{"prompt"}``; stage-2 prompts). ``auto`` picks the format from the file's first line.
A missing or empty file, a line that is not UTF-8 or not a JSON object, or a line without the needed
string field raises a :class:`ValueError` naming the file, the line number and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

FORMATS = ("auto", "prompt_response", "text", "prompt")
FIELDS = {"prompt_response": ("prompt", "response"), "text": ("text",), "prompt": ("prompt",)}


def _lines(path: str) -> Iterator[tuple[int, dict]]:
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
            yield lineno, rec


def resolve_format(path: str, fmt: str, need: str, first: tuple[int, dict] | None) -> str:
    """The format of ``path`` for ``need`` ("train": stage 1, "prompt": stage 2) given its first record."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is unknown; use one of {list(FORMATS)}")
    if first is None:
        raise ValueError(f"{path}: the file is empty (no JSON lines)")
    if fmt == "auto":
        first_line, rec = first
        if need == "prompt":
            fmt = "prompt"
        elif "prompt" in rec and "response" in rec:
            fmt = "prompt_response"
        elif "text" in rec:
            fmt = "text"
        else:
            missing = "response" if "prompt" in rec else "text"
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
    return fmt


def iter_jsonl(path: str, fmt: str = "auto", need: str = "train") -> tuple[str, Iterator[tuple[int, dict]]]:
    """``(resolved format, iterator of (line number, record))`` over the checked lines of ``path``;
    each record keeps only the fields of its format (stage 2: the prompt). Errors are raised while
    iterating, at the offending line."""
    if path is None or not os.path.isfile(str(path)):
        raise ValueError(f"data file {path!r} does not exist (data.path)")
    path = str(path)
    first = next(_lines(path), None)
    fmt = resolve_format(path, fmt, need, first)
    fields = FIELDS[fmt] if need == "train" else ("prompt",)

    def gen():
        for lineno, rec in _lines(path):
            for key in fields:
                if key not in rec:
                    raise ValueError(f"{path}: line {lineno} has no {key!r} key (format {fmt}, needs {list(fields)})")
                if not isinstance(rec[key], str):
                    raise ValueError(
                        f"{path}: line {lineno}: {key!r} must be a string, got {type(rec[key]).__name__}"
                    )
            yield lineno, {k: rec[k] for k in fields}

    return fmt, gen()


def read_jsonl(path: str, fmt: str = "auto", need: str = "train") -> tuple[list[dict], str]:
    """Read and check every line of ``path``; returns (records, resolved format)."""
    fmt, it = iter_jsonl(path, fmt, need)
    return [rec for _, rec in it], fmt


def check_jsonl(path: str, fmt: str = "auto", stage: str = "sft") -> str:
    """Check a JSONL file for ``stage`` (streamed, nothing tokenised); returns the resolved format."""
    fmt, it = iter_jsonl(path, fmt, need="prompt" if stage == "opd" else "train")
    for _ in it:
        pass
    return fmt
