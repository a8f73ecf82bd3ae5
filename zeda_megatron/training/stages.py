"""What each optimizer step trains on, per stage: the trainer's loop is the same for both.

* :class:`OffPolicyStage` (``stage=sft``): the dataset's micro-batches (prompt/response pairs or text,
  padded or packed: :mod:`.batching`).
* :class:`OnPolicyStage` (``stage=opd``): the dataset's prompts, each answered ``samples_per_prompt``
  times by the live student (KV-cached sampling under the training layout, :mod:`.rollout`) while the
  engine's training memory is off the device (``stage.offload_while_sampling``); the step trains on
  the rollout's micro-batches and replays the routing recorded while sampling (``stage.router_replay``).

``stage.steps(engine)`` yields one :class:`StepInput` per step from ``start_step`` to
``trainer.max_steps``. A step's data depends only on ``(seed, step)`` (:mod:`.batching`), so a resumed
run sees what an uninterrupted one would; stage 2's random draws are seeded per ``(seed, step, DP
rank)`` the same way (:func:`rollout_seed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


from zeda_megatron.spec import RunSpec
from zeda_megatron.training.batching import SEED_STRIDE, iterate_batches, prompts_of

# with fewer than STEP_STRIDE DP ranks, every (step, DP rank) pair of a run gets its own sampling seed
STEP_STRIDE = 1009


@dataclass
class StepInput:
    """What :func:`zeda_megatron.training.step.train_step` takes for one step (``step`` is 0-based)."""

    step: int
    microbatches: list[dict]
    replay: list | None = None  # per micro-batch, per MoE layer: the top-k chosen while sampling (router replay)


def rollout_seed(seed: int, step: int, dp_rank: int) -> int:
    """The seed of stage 2's sampling generator at ``step``: equal on the ranks of one model replica (the
    sampler draws on every rank and they must agree), distinct across DP replicas and steps."""
    return seed * SEED_STRIDE + step * STEP_STRIDE + dp_rank


class Stage:
    """The step inputs of one DP rank: ``num_microbatches`` micro-batches per step (see the module doc)."""

    rows_per_item = 1  # batch rows each dataset item becomes

    def __init__(self, spec: RunSpec, dataset, tokenizer, *, dp_rank: int, dp_size: int, start_step: int = 0):
        self.spec, self.dataset, self.tokenizer = spec, dataset, tokenizer
        self.dp_rank, self.dp_size, self.start_step = dp_rank, dp_size, start_step

    def data(self) -> Iterator[list[dict]]:
        """This rank's dataset micro-batches for the steps ``start_step .. trainer.max_steps - 1``."""
        tr = self.spec.trainer
        return iterate_batches(self.dataset, tr.micro_batch_size // self.rows_per_item, tr.num_microbatches,
                               self.dp_rank, self.dp_size, self.spec.seed, start_step=self.start_step,
                               max_steps=tr.max_steps)

    def steps(self, engine) -> Iterator[StepInput]:
        for step, micro in enumerate(self.data(), start=self.start_step):
            yield self.step_input(engine, step, micro)

    def step_input(self, engine, step: int, micro: list[dict]) -> StepInput:
        raise NotImplementedError


class OffPolicyStage(Stage):
    """Stage 1: the step trains on the dataset's micro-batches as they are."""

    def step_input(self, engine, step: int, micro: list[dict]) -> StepInput:
        return StepInput(step, micro)


class OnPolicyStage(Stage):
    """Stage 2: the step trains on the live student's answers to the dataset's prompts."""

    def __init__(self, spec: RunSpec, dataset, tokenizer, **kw):
        super().__init__(spec, dataset, tokenizer, **kw)
        self.rows_per_item = spec.stage.samples_per_prompt  # a prompt's samples share its micro-batch

    def step_input(self, engine, step: int, micro: list[dict]) -> StepInput:
        from zeda_megatron.plan.memory import decode_batch
        from zeda_megatron.training.rollout import sample

        st, tok = self.spec.stage, self.tokenizer
        prompts = [prompts_of(mb, repeat=st.samples_per_prompt) for mb in micro]
        # the live student samples the step's sequences in decode_batch slots (continuous batching), each
        # prompt from its own stream of a seed equal on the ranks of one replica; its routing is recorded
        # while sampling and replayed in the training forward. Grad buffers and optimizer state leave the
        # GPU meanwhile.
        with engine.offloaded_for_sampling(enabled=st.offload_while_sampling):
            rollout = sample(engine.student, prompts, max_new_tokens=st.max_new_tokens,
                             temperature=st.temperature, top_p=st.top_p, slots=decode_batch(self.spec),
                             eos_id=tok.eos_id, pad_id=tok.pad_id,
                             seed=rollout_seed(self.spec.seed, step, self.dp_rank), record_routing=st.router_replay)
        return StepInput(step, rollout.batches, rollout.replay)


def build_stage(spec: RunSpec, dataset, tokenizer, *, dp_rank: int, dp_size: int, start_step: int = 0) -> Stage:
    """The stage ``spec.stage`` names, reading ``dataset`` (:func:`.datasets.build_dataset`)."""
    cls = OnPolicyStage if spec.stage.needs_sampling else OffPolicyStage
    return cls(spec, dataset, tokenizer, dp_rank=dp_rank, dp_size=dp_size, start_step=start_step)
