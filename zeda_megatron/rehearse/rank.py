"""One rank role of the job, rehearsed: the trainer's build and the stage's step under the tracker.

:func:`measure_rank` builds the engine with the trainer's own code
(:func:`zeda_megatron.training.engine.build_engine` on a shapes-only spec: megatron-core's
initialisation, no weights read), then runs what one training step of the stage does on this rank:

* stage 1: one ``train_step`` (the trainer's) on micro-batches of ``micro_batch_size x seq_length``
  tokens (as many as 1F1B keeps in flight on this stage: ``min(num_microbatches, pp)``; the others
  repeat the same memory);
* stage 2: the training state offloaded as configured (``engine.offloaded_for_sampling``), the
  project's sampler (:func:`zeda_megatron.training.rollout.sample`) in ``decode_batch`` slots on
  prompts of ``seq_length - max_new_tokens`` tokens, its KV cache sized for the whole length, the
  prefill of every slot and ``decode_steps`` decode steps (or ``sampler_steps`` forwards in all); the
  state restored; then the training step on full-length sequences.

With ``fake=True`` (the rehearsal) the process is a rank of a fake world and every tensor is a
``FakeTensor`` on the CPU; ``fake=False`` runs the same code on real tensors (a small model in a
real world of one process: the tests compare the two).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from zeda_megatron import assumptions
from zeda_megatron.rehearse.tracker import AllocationTracker, storage_bytes

DECODE_STEPS = 4  # decode steps after every slot's prefill (each one is the same memory)


def synthetic_microbatches(spec, n: int, vocab: int) -> list[dict]:
    """``n`` micro-batches of ``micro_batch_size x seq_length`` tokens, every position trained."""
    tr = spec.trainer
    b, s = tr.micro_batch_size, tr.seq_length
    out = []
    for _ in range(n):
        tokens = torch.randint(1, vocab, (b, s))
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                    "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
                    "loss_mask": torch.ones(b, s), "padding_mask": torch.zeros(b, s, dtype=torch.bool)})
    return out


def optimizer_parts(engine, offloaded: bool) -> tuple[int, int]:
    """(device bytes, host bytes) of the optimizer: Adam's moments, fp32 master copies and the fp32
    gradients of those copies, apart from the model's weights and the DDP grad buffer. With the optimizer
    offloaded whole (megatron-core's CPU offload at fraction 1) all of it is host memory."""
    opts = []
    for opt in getattr(engine.optimizer, "chained_optimizers", None) or [engine.optimizer]:
        inner = getattr(opt, "optimizer", None)
        opts.append(opt)
        if inner is not None:  # megatron's wrapper -> the torch optimizer (or the CPU-offload one's parts)
            opts += [inner, *getattr(inner, "cpu_optimizers", []), getattr(inner, "gpu_optimizer", None)]
    exclude = list(engine.student.parameters())  # an fp32 optimizer steps the model's own weights
    ddp = engine.ddp
    exclude += [b.grad_data for b in list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))]
    total = _optimizer_tensor_bytes([o for o in opts if o is not None], exclude)
    return (0, total) if offloaded else (total, 0)


def _optimizer_tensor_bytes(opts, exclude) -> int:
    tensors = []
    for o in opts:
        if isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                tensors += [v for v in st.values() if torch.is_tensor(v)]
            for g in o.param_groups:
                tensors += [t for p in g["params"] for t in (p, p.grad)]
        for name in ("shard_fp32_from_float16_groups", "shard_fp32_groups"):
            for group in getattr(o, name, None) or []:
                tensors += list(group)
        tensors += list((getattr(o, "cpu_copy_map_grad", None) or {}).values())
    return storage_bytes(tensors, exclude=exclude)


def grad_buffer_bytes(ddp) -> int:
    buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    return storage_bytes([b.grad_data for b in buffers])


def measure_rank(spec, rank: int = 0, *, fake: bool = True, assumption=None,
                 decode_steps: int = DECODE_STEPS, sampler_steps: int | None = None) -> dict:
    """Measured bytes of rank ``rank`` (see the module doc): {"rank", "measured_bytes": {part: bytes},
    "measured_peak", "host_bytes", "seconds": {...}}."""
    from zeda_megatron.rehearse.fake import init_fake_world, tensors_as_cuda
    from zeda_megatron.training.engine import build_engine

    t0 = time.time()
    assumption = assumption or assumptions.Assumption()
    spec = spec.with_(**{"model.source": "shapes"})  # megatron-core's initialisation: no weights are read
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        init_fake_world(spec, rank)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    else:
        from zeda_megatron.distributed import init_parallel

        lay = spec.layout
        init_parallel(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, seed=spec.seed)
        mode = contextlib.nullcontext()
    tracker = AllocationTracker()
    times = {}
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(assumptions.assuming(assumption))
        stack.enter_context(mode)
        stack.enter_context(tracker)
        with tensors_as_cuda() if fake else contextlib.nullcontext(), _host_optimizer(spec, tracker):
            engine = build_engine(spec, None)
        tracker.peak = tracker.live  # the build's transients (whole-tensor inits) are not the run's peak
        times["build_s"] = time.time() - t0
        _host_optimizer_step(engine, tracker, offloaded_optimizer(spec), fake)
        # one update on zero gradients first: the optimizer's state exists (as from the second step on)
        engine.start_step([])
        engine.finish_step()
        parts = {
            "student_params": storage_bytes(list(engine.student.parameters())),
            "teacher_params": storage_bytes(list(engine.teacher.parameters())),
            "student_grads": grad_buffer_bytes(engine.ddp),
        }
        dev_opt, host_opt = optimizer_parts(engine, offloaded_optimizer(spec))
        parts["optimizer_states"] = dev_opt
        static_build = tracker.live
        vocab = spec.model.hf_config["vocab_size"]
        if spec.stage.needs_sampling:
            t1 = time.time()
            parts["rollout_kv_cache"] = _rollout(engine, spec, tracker, decode_steps, fake, assumption,
                                                   sampler_steps)
            times["rollout_s"] = time.time() - t1
        t1 = time.time()
        from megatron.core import parallel_state as ps

        n_mb = min(spec.trainer.num_microbatches, ps.get_pipeline_model_parallel_world_size())
        micro = synthetic_microbatches(spec, n_mb, vocab)
        from zeda_megatron.training.step import train_step

        with tracker.phase() as step, _loss_phase(tracker) as loss:
            train_step(engine, micro)
        times["step_s"] = time.time() - t1
        parts["loss_logits"] = loss["peak"]
        # activations: the most the step holds outside the loss (the backward's peak); at the loss,
        # what was live before it plus the loss's own peak
        parts["activations"] = step["peak"] - step["start"]
        at_loss = loss.get("live_before", 0) - step["start"]
        host_opt = optimizer_parts(engine, offloaded_optimizer(spec))[1]  # (its gradient copies exist now)
    return {"rank": rank, "measured_bytes": parts, "measured_peak": tracker.peak, "static_bytes": static_build,
            "activations_at_loss": at_loss,
            "host_bytes": {"optimizer": host_opt, "tracked": tracker.host_live}, "seconds": times,
            "wall_s": time.time() - t0}


@contextlib.contextmanager
def _loss_phase(tracker):
    """The most the last stage's loss (the fused output layer + KL, or the materialised logits' loss)
    adds on top of what was live when it began: ``{"peak": bytes}``."""
    from zeda_megatron.training import distill

    out = {"peak": 0}
    fused, plain = distill.fused_token_losses, distill.token_losses

    def measured(fn):
        def run(*args, **kwargs):
            with tracker.apart(), tracker.phase() as p:
                result = fn(*args, **kwargs)
            out["peak"] = max(out["peak"], p["peak"] - p["start"])
            out["live_before"] = max(out.get("live_before", 0), p["start"])
            return result
        return run

    distill.fused_token_losses, distill.token_losses = measured(fused), measured(plain)
    try:
        yield out
    finally:
        distill.fused_token_losses, distill.token_losses = fused, plain


def offloaded_optimizer(spec) -> bool:
    """The whole optimizer lives on the host (megatron-core's CPU offload of every state)."""
    return spec.optim.cpu_offload and spec.optim.offload_fraction >= 1.0


@contextlib.contextmanager
def _host_optimizer(spec, tracker):
    """megatron-core's optimizer is built on the host when it is offloaded whole: what its build
    allocates counts as host memory."""
    import megatron.core.optimizer as mo

    if not offloaded_optimizer(spec):
        yield
        return
    orig = mo.get_megatron_optimizer

    def get_megatron_optimizer(*args, **kwargs):
        with tracker.host():
            return orig(*args, **kwargs)

    mo.get_megatron_optimizer = get_megatron_optimizer
    try:
        yield
    finally:
        mo.get_megatron_optimizer = orig


def _host_optimizer_step(engine, tracker, offload: bool, fake: bool) -> None:
    """The optimizer step is measured apart from the step's activations; the CPU-offload optimizer's
    step runs on the host (its copies are host memory); on fake tensors they report CUDA while
    megatron-core steps (:func:`.fake.tensors_as_cuda`)."""
    from zeda_megatron.rehearse.fake import tensors_as_cuda

    finish = engine.finish_step

    def finish_step():
        with tensors_as_cuda() if fake else contextlib.nullcontext(), tracker.apart(), \
                (tracker.host() if offload else contextlib.nullcontext()):
            return finish()

    engine.finish_step = finish_step


def _rollout(engine, spec, tracker, decode_steps: int, fake: bool, assumption, sampler_steps=None) -> int:
    """Stage 2's sampling phase; returns the bytes it adds on top of the (offloaded) training state."""
    from zeda_megatron.plan.memory import decode_batch
    from zeda_megatron.training.rollout import sample

    st, tr = spec.stage, spec.trainer
    slots = decode_batch(spec)
    prompt = tr.seq_length - st.max_new_tokens
    from zeda_megatron.plan.memory import TOKEN_BUDGET as token_budget

    prefill_steps = math.ceil(slots * prompt / token_budget)
    # sampler_steps: stop sooner (the whole cache is allocated at the first step, whose prompt chunks fill
    # the token budget; the second adds the first decode tokens and their sampling)
    steps = sampler_steps or prefill_steps + decode_steps
    prompts = [[[1] * prompt for _ in range(slots)]]
    with engine.offloaded_for_sampling(enabled=st.offload_while_sampling):
        stop = assumptions.Assumption(null_share=assumption.null_share, sampler_steps=steps)
        with tracker.phase() as p, assumptions.assuming(stop) if fake else contextlib.nullcontext():
            sample(engine.student, prompts, max_new_tokens=st.max_new_tokens, temperature=st.temperature,
                   top_p=st.top_p, slots=slots, eos_id=0, pad_id=0, seed=spec.seed, record_routing=False,
                   token_budget=token_budget, on_finished=lambda seqs: None)
    return p["peak"] - p["start"]
