"""Token choice and each prompt's own random stream.

A prompt's draws never depend on which other prompts share its decode steps: prompt ``key`` under
base seed ``seed`` owns the stream ``torch.Generator().manual_seed(stream_seed(seed, key))`` and its
``i``-th sampled token uses that stream's ``i``-th uniform. Sampling it alone, in a full batch, in
another slot or after a restart gives the same tokens.
"""

from __future__ import annotations

import torch

_MASK = (1 << 63) - 1


def stream_seed(seed: int, key: int) -> int:
    """The seed of prompt ``key``'s stream under base ``seed`` (a 64-bit mix, so that neighbouring
    keys and seeds give unrelated streams)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(key) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & _MASK


def prompt_uniforms(seed: int, key: int, n: int) -> torch.Tensor:
    """The first ``n`` uniforms of prompt ``key``'s stream (float32, CPU)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(stream_seed(seed, key)))


def base_seed_from(generator: torch.Generator) -> int:
    """A base seed drawn from ``generator`` (callers that hand the sampler a generator)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


def choose_tokens(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """Next tokens [b] from full-vocabulary logits [b, V]: argmax when ``temperature <= 0``, else
    inverse-CDF sampling with the uniforms ``u`` [b] from softmax(logits / T) restricted to the
    top-p nucleus (the smallest prefix of the sorted distribution whose mass reaches ``top_p``)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    index = None
    if top_p < 1.0:
        probs, index = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    x = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, x, right=True).clamp_max(cdf.shape[-1] - 1)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)
