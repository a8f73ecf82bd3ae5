"""One optimizer step of the co-located pair: batches onto the model's device, the pipeline
schedule, the optimizer step, the reported sums.

Batches arrive in the project's batch format (built on the host by the data code, :mod:`.batching`,
or by the sampler, :mod:`.rollout`): ``tokens``/``labels``/``position_ids`` [b, s] long (labels
:data:`~.batching.IGNORE_INDEX` where not trained), ``loss_mask`` [b, s] float, ``padding_mask``
[b, s] bool (True at pads), optional ``packed_seq_params``. The step moves
them to the model's device (:func:`model_device`), right-pads every micro-batch to one length that
is a multiple of what the layout needs (TP under sequence parallelism), and hands ``padding_mask``
to both models; attention is causal (``attention_mask`` None). The only host syncs are the reported
sums (one small all-reduce) and what the optimizer itself needs.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from zeda_megatron import assumptions
from zeda_megatron.distributed import all_reduce_host, comm_device
from zeda_megatron.training.batching import IGNORE_INDEX
from zeda_megatron.training.distill import double_hidden_shapes, loss_func


def model_device() -> torch.device:
    """The device the models live on: the current CUDA device on GPU, the CPU otherwise."""
    return comm_device()


def seq_multiple(config) -> int:
    """What every sequence length must be a multiple of: TP under sequence parallelism."""
    return int(config.tensor_model_parallel_size) if getattr(config, "sequence_parallel", False) else 1


def pad_batch(batch: dict, length: int, pad_id: int = 0) -> dict:
    """Right-pad a micro-batch to ``length`` positions: pads get ``padding_mask`` True, ``loss_mask``
    0, label IGNORE_INDEX and position ids continuing the row (causal attention never lets a real token see
    them). Tensors stay on their device. Keys other than the batch format's are passed through."""
    tokens = batch["tokens"]
    b, s = tokens.shape
    if s == length:
        out = dict(batch)
        if out.get("padding_mask") is None:
            out["padding_mask"] = torch.zeros(b, s, dtype=torch.bool, device=tokens.device)
        return out
    if s > length:
        raise ValueError(f"cannot pad a batch of length {s} to {length}")
    extra = length - s
    dev = tokens.device

    def grow(t, value):
        return torch.cat([t, t.new_full((b, extra), value)], dim=1)

    out = dict(batch)
    out["tokens"] = grow(tokens, pad_id)
    if batch.get("labels") is not None:
        out["labels"] = grow(batch["labels"], IGNORE_INDEX)
    if batch.get("loss_mask") is not None:
        out["loss_mask"] = grow(batch["loss_mask"], 0)
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    tail = pos[:, -1:] + torch.arange(1, extra + 1, device=dev).unsqueeze(0) if s else \
        torch.arange(extra, device=dev).unsqueeze(0).expand(b, extra)
    out["position_ids"] = torch.cat([pos, tail], dim=1)
    pm = batch.get("padding_mask")
    if pm is None:
        pm = torch.zeros(b, s, dtype=torch.bool, device=dev)
    out["padding_mask"] = grow(pm, True)
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and megatron PackedSeqParams' tensors) of a batch on ``device``; the copy is
    asynchronous from pinned memory."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device, non_blocking=True)
        elif k == "packed_seq_params" and v is not None:
            import copy

            p = copy.copy(v)
            for name, x in vars(v).items():
                if torch.is_tensor(x):
                    setattr(p, name, x.to(device, non_blocking=True))
            out[k] = p
        else:
            out[k] = v
    return out


def prepare_microbatches(microbatches: list[dict], config, device: torch.device | None = None,
                         pad_id: int = 0) -> list[dict]:
    """The step's micro-batches on the model's device, right-padded to one common length (the
    pipeline schedule sends fixed shapes) that is a multiple of :func:`seq_multiple`."""
    device = device or model_device()
    m = seq_multiple(config)
    length = max(mb["tokens"].shape[1] for mb in microbatches)
    length = -(-length // m) * m
    out = []
    for mb in microbatches:
        if mb.get("packed_seq_params") is not None and mb["tokens"].shape[1] != length:
            raise ValueError(f"packed micro-batch of length {mb['tokens'].shape[1]} must already be a multiple of {m}")
        out.append(pad_batch(to_device(mb, device), length, pad_id))
    return out


def model_inputs(batch: dict) -> tuple[tuple, dict]:
    """(args, kwargs) for :class:`~zeda_megatron.training.distill.CoLocatedDistillation`."""
    kw = {"padding_mask": batch.get("padding_mask")}
    if batch.get("packed_seq_params") is not None:
        kw["packed_seq_params"] = batch["packed_seq_params"]
    return (batch["tokens"], batch["position_ids"], None), kw


def run_schedule(engine, microbatches: list[dict], forward_only: bool, forward_step, *, seq_length=None,
                 collect_non_loss_data: bool = False):
    """megatron-core's forward/backward function (1F1B under PP) over ``microbatches`` (already on
    the device and of one length). Student and teacher hidden states travel together between
    stages while the teacher runs."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    kwargs = {}
    if ps.get_pipeline_model_parallel_world_size() > 1 and engine.wrapper.teacher_enabled:
        kwargs["adjust_tensor_shapes_fn"] = double_hidden_shapes
    return fb(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=engine.wrapper,
        num_microbatches=len(microbatches), seq_length=seq_length or microbatches[0]["tokens"].shape[1],
        micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data, **kwargs,
    )


def reset_routing_counters(engine) -> None:
    """Zero the routing counters (nothing is read: no host sync)."""
    from zeda_megatron.mcore.specs import moe_layers

    for layer in moe_layers(engine.student):
        layer.reset_routing_stats()


def train_step(engine, microbatches: list[dict], replay=None, pad_id: int = 0) -> dict:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step.

    ``replay``: per micro-batch lists of recorded top-k indices (router replay) or None. The
    routing counters are reset first, so the step's null-share metrics cover its training forward.
    Returns global sums {loss, nll, kl, tokens} (identical on every rank), grad_norm, lr.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    engine.wrapper.train()
    engine.wrapper.teacher_enabled = engine.loss_spec.needs_teacher
    engine.wrapper.fused_output = engine.loss_spec.fused
    microbatches = prepare_microbatches(microbatches, engine.config, pad_id=pad_id)
    counter = iter(range(len(microbatches)))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        m = next(counter)
        if replay is not None:
            RouterReplay.set_replay_data(replay[m])
        args, kw = model_inputs(batch)
        return model(*args, **kw), partial(loss_func, batch, engine.loss_spec)

    engine.start_step(microbatches)
    reset_routing_counters(engine)
    if replay is not None:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        reports = run_schedule(engine, microbatches, False, forward_step)
    finally:
        engine.wrapper.teacher_enabled = True
        engine.wrapper.fused_output = False
        if replay is not None:
            RouterReplay.clear_global_router_replay_action()
            RouterReplay.clear_global_indices()
    ok, grad_norm = engine.finish_step()
    if assumptions.current() is not None:  # no data (the rehearsal): the reported sums read as 0
        return {"loss": 0.0, "nll": 0.0, "kl": 0.0, "tokens": 0, "grad_norm": 0.0, "lr": engine.current_lr(),
                "update_ok": True}
    sums = torch.zeros(4, dtype=torch.float64, device=model_device())
    for r in reports or []:
        sums += r["sums"].double()
    sums = sum_over_last_stage_dp(sums)  # the one host sync of the reports
    return {
        "loss": (sums[0] / sums[3].clamp_min(1)).item(), "nll": (sums[1] / sums[3].clamp_min(1)).item(),
        "kl": (sums[2] / sums[3].clamp_min(1)).item(), "tokens": int(sums[3].item()),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": engine.current_lr(), "update_ok": bool(ok),
    }


def sum_over_last_stage_dp(sums: torch.Tensor) -> torch.Tensor:
    """Sum per-rank reports over the world, counting each DP replica once (TP ranks hold copies of
    the loss; only last-stage ranks report). Returns a host tensor."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return sums.cpu()
    t = sums.to(torch.float64)
    if not ps.is_pipeline_last_stage(ignore_virtual=True) or ps.get_tensor_model_parallel_rank() != 0:
        t = torch.zeros_like(t)
    return all_reduce_host(t)
