"""Response and prompt lengths the time plan assumes.

Default (the reference's responses are long-tailed reasoning traces; their statistics were not
published): response tokens ~ lognormal with median ``limit / 8`` and sigma 1.0, rounded and cut to
[1, limit] (at the reference's 32,768-token limit: median 4,096, mean ~6,400, ~2 % at the limit);
prompts of 512 tokens. ``--lengths FILE.jsonl`` replaces both with real lines: a line's response length
is its ``response_tokens`` (or ``num_tokens`` / ``length``) field, else its ``response`` text at 4
characters per token; its prompt length likewise from ``prompt_tokens`` or ``prompt``.
"""

from __future__ import annotations

import json
import math

import numpy as np

DEFAULT_SIGMA = 1.0
DEFAULT_PROMPT_TOKENS = 512
CHARS_PER_TOKEN = 4
SEED = 0


class Lengths:
    """Draws of (response, prompt) token counts, cut at the response limit."""

    def __init__(self, responses: np.ndarray | None = None, prompts: np.ndarray | None = None,
                 sigma: float = DEFAULT_SIGMA, prompt_tokens: int = DEFAULT_PROMPT_TOKENS, source: str = ""):
        self.responses, self.prompts = responses, prompts
        self.sigma, self.prompt_tokens = sigma, prompt_tokens
        self.source = source or (f"lognormal(median limit/8, sigma {sigma}) cut at the limit; prompts "
                                 f"{prompt_tokens} tokens")

    def draw(self, n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` response lengths for a ``limit``-token cap."""
        if self.responses is not None:
            x = rng.choice(self.responses, size=n, replace=True)
        else:
            x = np.round(np.exp(math.log(limit / 8) + self.sigma * rng.standard_normal(n)))
        return np.clip(x, 1, limit).astype(np.int64)

    def prompt_mean(self) -> float:
        return float(self.prompts.mean()) if self.prompts is not None and len(self.prompts) else float(self.prompt_tokens)

    def moments(self, limit: int, n: int = 200_000) -> dict:
        """Mean response length, the length-biased mean context of a decoded token (a token sits at
        position prompt + U * L of a length-L response: longer responses hold more tokens), the share at
        the limit."""
        x = self.draw(n, limit, np.random.default_rng(SEED)).astype(np.float64)
        return {"mean": float(x.mean()), "ctx": self.prompt_mean() + float((x * x).mean() / (2 * x.mean())),
                "at_limit": float((x >= limit).mean()), "median": float(np.median(x))}


def lengths_from_jsonl(path: str) -> Lengths:
    """Real responses (see the module docstring); a clear error naming the file and line otherwise."""
    resp, prompt = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}: line {i} is not JSON (--lengths takes a JSONL of responses)") from None
            n = _count(row, ("response_tokens", "num_tokens", "length"), "response")
            if n is None:
                raise ValueError(f"{path}: line {i} has no response_tokens/num_tokens/length or response field")
            resp.append(n)
            p = _count(row, ("prompt_tokens",), "prompt")
            if p is not None:
                prompt.append(p)
    if not resp:
        raise ValueError(f"{path}: no responses (--lengths takes a JSONL of responses)")
    r = np.asarray(resp, dtype=np.int64)
    p = np.asarray(prompt, dtype=np.int64) if prompt else None
    return Lengths(r, p, source=f"{len(r)} responses from {path} (mean {r.mean():.0f} tokens)")


def _count(row: dict, int_keys: tuple, text_key: str) -> int | None:
    for k in int_keys:
        if isinstance(row.get(k), int) and not isinstance(row.get(k), bool):
            return int(row[k])
    if isinstance(row.get(text_key), str):
        return max(1, len(row[text_key]) // CHARS_PER_TOKEN)
    return None
