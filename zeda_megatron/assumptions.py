"""The one hook for data-dependent values when tensors carry no data (the fake-tensor rehearsal).

Under ``FakeTensorMode`` a tensor has a shape, a dtype and a device but no values: ``.item()``,
``.tolist()`` and anything sized by a tensor's contents (``nonzero``, the all-to-all split sizes of
the null-aware dispatcher) cannot be computed. The rehearsal (:mod:`zeda_megatron.rehearse`) states
what it assumes instead, once, through :func:`assuming`; the places that would read a value ask
:func:`current` and take the assumption's number when one is set. With no assumption set (every
real run) :func:`current` is None and those places run their normal code unchanged.

The assumption (:class:`Assumption`):

* routing: a share ``null_share`` of each token's top-k slots goes to null experts (0, the default:
  the worst case, every slot real), the real slots spread evenly over the experts and hence over the
  expert-parallel ranks (every rank sends and receives the same number of rows);
* the fused KL trains every token of the batch (no zero-weight token is skipped);
* the sampler never samples EOS (every sequence runs to its length limit), and stops after
  ``sampler_steps`` forwards when that is set (the rehearsal's prefill and a few decode steps);
* reported values (losses, counters, the gradient norm) read as 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Assumption:
    null_share: float = 0.0  # share of routed top-k slots on null experts (0: every slot real, the worst case)
    sampler_steps: int | None = None  # the sampler stops after this many forwards (None: when all are done)

    def real_rows(self, tokens: int, topk: int) -> int:
        """Routed rows (token, real expert) of ``tokens`` tokens."""
        return int(round(tokens * topk * (1.0 - self.null_share)))


def even_split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as integers allow (the first ones take the remainder)."""
    q, r = divmod(int(total), int(parts))
    return [q + (1 if i < r else 0) for i in range(parts)]


_CURRENT: Assumption | None = None


def current() -> Assumption | None:
    """The assumption in force (None: a real run; read the tensors)."""
    return _CURRENT


@contextlib.contextmanager
def assuming(assumption: Assumption):
    """Data-dependent values come from ``assumption`` for the duration."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, assumption
    try:
        yield assumption
    finally:
        _CURRENT = previous
