"""Helpers for the trainer tests: an engine on a tiny HF checkpoint, batches in the project's batch
format built by hand (independently of the package's padding code), a forward that records the
routing, per-row views of the routing."""

from __future__ import annotations

import torch

PAD_GARBAGE_SEED = 1234


def make_engine(hf_dir: str, *, stage: str = "sft", kl_weight: float = 0.5, nll_weight: float = 1.0,
                num_null: int = 4, group_loss_coeff: float = 0.1, lr: float = 0.0, router_replay: bool = True,
                sequence_parallel: bool = False, seed: int = 0, bias_update: bool = False):
    """A co-located engine (after init_parallel). ``lr=0``: steps leave the weights unchanged, so
    one engine serves many comparisons; expert-bias updates are off (``bias_update``) for the same reason."""
    from spec_fixtures import run_spec

    from zeda_megatron.training.engine import build_engine

    spec = run_spec(
        hf_dir, f"stage={stage}", f"stage.nll_weight={nll_weight}", f"stage.kl_weight={kl_weight}", "stage.kl=exact",
        "stage.temperature=1.0", "stage.samples_per_prompt=1", "stage.max_new_tokens=1",
        "model.null_experts.ratio=null", f"model.null_experts.num={num_null}", "model.null_experts.weight=2.0",
        f"model.group_loss_coeff={group_loss_coeff}", f"optim.lr={lr}", "optim.min_lr=0", "optim.schedule=constant",
        "optim.warmup_fraction=0", "optim.clip_grad=1e9", "optim.weight_decay=0.0", "optim.adam_beta1=0.9",
        "optim.adam_beta2=0.999", "trainer.max_steps=10",
        f"seed={seed}", f"stage.router_replay={router_replay}", f"parallel.sequence_parallel={sequence_parallel}",
        "trainer.precision=fp32")
    engine = build_engine(spec)
    if not bias_update:
        engine.config.moe_router_bias_update_rate = 0.0
    return engine


def batch_of(seqs: list[list[int]], length: int | None = None, prompt_lens: list[int] | None = None,
             garbage_vocab: int = 100) -> dict:
    """Right-padded batch of token sequences: row j predicts ``seqs[j][1:]`` (loss after its prompt);
    pad positions hold random garbage tokens/labels (they must not matter), loss_mask 0,
    padding_mask True, position ids 0..length-1."""
    n = max(len(s) for s in seqs) - 1
    length = length or n
    gen = torch.Generator().manual_seed(PAD_GARBAGE_SEED)
    b = len(seqs)
    tokens = torch.randint(0, garbage_vocab, (b, length), generator=gen)
    labels = torch.randint(0, garbage_vocab, (b, length), generator=gen)
    loss_mask = torch.zeros(b, length)
    padding_mask = torch.ones(b, length, dtype=torch.bool)
    for j, s in enumerate(seqs):
        m = len(s) - 1
        tokens[j, :m] = torch.tensor(s[:-1])
        labels[j, :m] = torch.tensor(s[1:])
        first = max((prompt_lens or [1] * b)[j] - 1, 0)
        loss_mask[j, first:m] = 1
        padding_mask[j, :m] = False
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(length).unsqueeze(0).expand(b, length).contiguous(),
            "padding_mask": padding_mask}


@torch.no_grad()
def record_routing(engine, batches, pad_id: int = 0) -> list[list[torch.Tensor]]:
    """Per micro-batch, per MoE layer, the top-k indices a free forward-only pass (student alone, the
    training step's preparation, megatron-core's RouterReplay RECORD) chooses for ``batches``."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from zeda_megatron.training.step import model_inputs, prepare_microbatches, run_schedule

    recorded = []
    engine.wrapper.eval()
    engine.wrapper.teacher_enabled = False
    mbs = prepare_microbatches(batches, engine.config, pad_id=pad_id)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        def forward_step(data_iterator, model):
            args, kw = model_inputs(next(data_iterator))
            out = model(*args, **kw)
            recorded.append([t.clone() for t in RouterReplay.get_recorded_data()])
            return out, lambda output, non_loss_data=True: None

        run_schedule(engine, mbs, True, forward_step, seq_length=mbs[0]["tokens"].shape[1], collect_non_loss_data=True)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        engine.wrapper.teacher_enabled = True
    return recorded


def replay_rows(replay_mb: list[torch.Tensor], batch_size: int, rows: slice) -> list[torch.Tensor]:
    """A router-replay micro-batch ([s*b, k] per layer, s-major) cut to the batch rows ``rows``."""
    out = []
    for t in replay_mb:
        k = t.shape[-1]
        out.append(t.reshape(-1, batch_size, k)[:, rows].reshape(-1, k).contiguous())
    return out


def rows_routing(recorded_layers: list[torch.Tensor], batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Per MoE layer, the recorded top-k indices as [b, s, k] (megatron records [s*b, k])."""
    return [t.reshape(seq_len, batch_size, -1).transpose(0, 1).cpu() for t in recorded_layers]


def step_metrics(engine, microbatches, replay=None, pad_id: int = 0) -> dict:
    """One train step's reported sums + routing metrics (null counters, group loss)."""
    from zeda_megatron.training.moe_metrics import group_loss, null_metrics
    from zeda_megatron.training.step import train_step

    out = train_step(engine, microbatches, replay=replay, pad_id=pad_id)
    routing = null_metrics(engine)
    out.update(group_loss=group_loss(engine, len(microbatches)), null_share=routing["null_share"],
               null_slots=routing["null_slots"], routed_slots=routing["routed_slots"])
    return out
