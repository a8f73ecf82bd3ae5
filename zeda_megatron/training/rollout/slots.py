"""Decode slots and their scheduling (host side, no tensors).

Every sequence (a prompt and the response sampled for it) lives in one slot from its admission to
its end; a slot holds one sequence at a time, and its KV cache rows are the sequence's positions.
Each engine step feeds, per busy slot, either the next chunk of its prompt (prefill, several
tokens) or the token it sampled last (decode, one token); the logits at a slot's last fed position
are sampled once its whole prompt is in the cache.

* ``refill=True`` (continuous batching): a slot freed by EOS or the length limit takes the next
  waiting prompt at the next step, while the other slots keep decoding.
* ``refill=False`` (static batches, the benchmark's baseline): new prompts enter only when every
  slot is free, so a batch runs as long as its longest sequence.

``token_budget`` bounds the tokens one step feeds: decode tokens first (one per slot), then prompt
chunks in slot order (a long prompt is prefilled over several steps; its chunks attend to the
chunks already cached).
"""

from __future__ import annotations

from zeda_megatron.plan.memory import TOKEN_BUDGET

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Sequence:
    """One prompt and its response. ``tokens`` = prompt + sampled tokens; ``fed`` = positions
    already in the cache (the next position to feed)."""

    index: int  # position in the caller's flattened prompt list
    prompt: list
    limit: int  # sampled tokens at most (EOS included)
    key: int  # the prompt's random-stream key
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    fed: int = 0
    done: bool = False

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def sampled(self) -> int:
        return len(self.tokens) - len(self.prompt)


@dataclass
class StepPlan:
    """What one step feeds (flattened: token ``t`` of the step belongs to ``slot[t]`` at ``pos[t]``).

    singles: step indices of slots that feed exactly one token (decode, or a one-token chunk).
    chunks: (start, end, slot, first position) of slots that feed several tokens (prefill).
    samples: (step index, slot, sequence) whose logits are sampled this step.
    rows: (slot, sequence, first position, count) per busy slot, in step order.
    """

    ids: list = field(default_factory=list)
    pos: list = field(default_factory=list)
    slot: list = field(default_factory=list)
    seq: list = field(default_factory=list)  # sequence index per token (-1: a filler token)
    singles: list = field(default_factory=list)
    chunks: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    rows: list = field(default_factory=list)

    def __len__(self):
        return len(self.ids)


class Slots:
    """The slots of one rank and its queue of waiting sequences."""

    def __init__(self, sequences: list[Sequence], n_slots: int, *, refill: bool = True, token_budget: int = TOKEN_BUDGET,
                 keep_finished: bool = True):
        if n_slots < 1:
            raise ValueError(f"the sampler needs at least one decode slot, got {n_slots}")
        self.queue = deque(sequences)
        self.slots: list[Sequence | None] = [None] * n_slots
        self.refill = refill
        self.token_budget = max(1, int(token_budget))
        self.finished: list[Sequence] = []
        self.keep_finished = keep_finished

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.queue) or self.busy > 0

    def admit(self) -> list[tuple[int, Sequence]]:
        """Move waiting sequences into free slots (refill: any free slot; static: only when all
        slots are free). Returns the (slot, sequence) pairs admitted."""
        if not self.queue or (not self.refill and self.busy):
            return []
        admitted = []
        for i, s in enumerate(self.slots):
            if s is None and self.queue:
                seq = self.queue.popleft()
                self.slots[i] = seq
                admitted.append((i, seq))
        return admitted

    def plan(self) -> StepPlan:
        """The tokens of the next step (empty when no slot is busy)."""
        plan = StepPlan()
        # decode tokens first; then prompt chunks while the budget lasts (with no slot decoding the
        # whole budget, >= 1, goes to prompts: every step makes progress)
        feed = {i: 1 for i, s in enumerate(self.slots) if s is not None and s.fed >= len(s.prompt)}
        budget = self.token_budget - len(feed)
        for i, s in enumerate(self.slots):
            if s is None or i in feed or budget <= 0:
                continue
            n = min(len(s.prompt) - s.fed, budget)
            feed[i] = n
            budget -= n
        for i in sorted(feed):
            s, n = self.slots[i], feed[i]
            start = len(plan)
            p0 = s.fed
            plan.ids.extend(s.tokens[p0:p0 + n])
            plan.pos.extend(range(p0, p0 + n))
            plan.slot.extend([i] * n)
            plan.seq.extend([s.index] * n)
            plan.rows.append((i, s, p0, n))
            if n == 1:
                plan.singles.append(start)
            else:
                plan.chunks.append((start, start + n, i, p0))
            if p0 + n >= len(s.prompt):  # the whole prompt is cached after this step: sample
                plan.samples.append((start + n - 1, i, s))
        return plan

    def advance(self, plan: StepPlan, tokens: list[int], logprobs: list[float], eos_id: int) -> list[Sequence]:
        """Apply one step's results (``tokens``/``logprobs`` per ``plan.samples``); returns the
        sequences that ended (their slots are free)."""
        for i, s, p0, n in plan.rows:
            s.fed = p0 + n
        ended = []
        for (_, i, s), tok, lp in zip(plan.samples, tokens, logprobs):
            s.tokens.append(int(tok))
            s.logprobs.append(float(lp))
            if int(tok) == eos_id or s.sampled >= s.limit:
                s.done = True
                self.slots[i] = None
                if self.keep_finished:
                    self.finished.append(s)
                ended.append(s)
        return ended

    @staticmethod
    def last_token_flags(plan: StepPlan) -> list[int]:
        """Per sampled row: 1 when the token sampled now is the sequence's last allowed one."""
        return [int(s.sampled + 1 >= s.limit) for _, _, s in plan.samples]
