"""The distillation job: ``python -m zeda_megatron.train model=tiny_qwen3 stage=sft trainer.max_steps=20``.

One process, or several under ``torchrun`` (Slurm: ``srun torchrun ...``, see slurm/). Composed by
Hydra from conf/; the run folder holds the resolved config (config.yaml), ``metrics.jsonl`` (one JSON
object per step) and ``checkpoints/``. Everything is checked before any model is built.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from zeda_megatron.distributed import all_reduce_host

log = logging.getLogger("zeda_megatron.train")


def _teacher_source(spec, run_dir: str, rank0: bool) -> str:
    """The original model's HF directory: model.hf_dir, or (tiny random-init models) a seeded random
    checkpoint written once into the run folder with transformers' own classes."""
    if spec.model.hf_dir:
        return spec.model.hf_dir
    path = os.path.join(run_dir, "teacher_hf")
    if rank0 and not os.path.isfile(os.path.join(path, "config.json")):
        from zeda_megatron.training.random_init import write_random_hf

        write_random_hf(spec.model.hf_config, path, seed=spec.seed)
    if dist.is_initialized():
        dist.barrier()
    return path


def _fingerprint(module) -> str:
    """Exact digest of a module's tensors (this rank's shard)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if torch.is_tensor(t):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _all_ranks_true(flag: bool) -> bool:
    return int(all_reduce_host(torch.tensor([0 if flag else 1]))) == 0


def _resume_path(spec, save_dir: str):
    from zeda_megatron.training import checkpoint

    mode = spec.trainer.resume
    if mode == "never":
        if checkpoint.latest(save_dir):
            raise FileExistsError(
                f"trainer.resume=never but {save_dir} already holds checkpoints: use trainer.resume=auto "
                "to continue that run, or a new hydra.run.dir / trainer.save_dir (nothing was overwritten)"
            )
        return None
    if mode == "auto":
        return checkpoint.latest(save_dir)
    if not os.path.isdir(mode):
        raise FileNotFoundError(f"trainer.resume={mode!r} is not a directory; use auto, never or a checkpoint path")
    return checkpoint.latest(mode) or mode


def run(cfg) -> dict:
    """Train per ``cfg`` (a composed config); returns the last step's metrics (rank 0)."""
    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.training import checkpoint, signals
    from zeda_megatron.training.data import build_dataset, iterate_batches, load_tokenizer, prompts_of
    from zeda_megatron.training.engine import build_engine
    from zeda_megatron.training.moe_metrics import group_loss, null_metrics
    from zeda_megatron.training.step import train_step
    from zeda_megatron.training.metrics import MetricsWriter, ProgressPrinter, WandbLogger, save_resolved_config
    from zeda_megatron.training.validate import validate_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec = validate_config(cfg, world)  # the run's spec: everything checked before any process group, model or file
    tokenizer = load_tokenizer(cfg.model)
    dataset = build_dataset(cfg, tokenizer)  # data errors (file, line, key) before the model
    lay, tr, stage = spec.layout, spec.trainer, spec.stage
    init_parallel(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, seed=spec.seed)
    rank = dist.get_rank()
    rank0 = rank == 0
    dirs = [str(spec.run_dir), str(tr.save_dir)]
    dist.broadcast_object_list(dirs, src=0)  # ranks > 0 run Hydra without an output folder of their own
    run_dir, save_dir = dirs
    resume = _resume_path(spec, save_dir)  # before anything is written or built
    if rank0:
        os.makedirs(run_dir, exist_ok=True)
        save_resolved_config(cfg, run_dir)
    hf_dir = _teacher_source(spec, run_dir, rank0)
    engine = build_engine(spec, hf_dir)
    start = 0
    if resume:
        start = int(checkpoint.load(engine, resume)["step"])
        if rank0:
            log.info("resumed from %s at step %d", resume, start)
    writer = MetricsWriter(run_dir, rank0=rank0, resume_step=start)
    wandb = WandbLogger(cfg, rank0=rank0, run_dir=run_dir)
    progress = ProgressPrinter(tr.max_steps, rank0=rank0, enabled=bool(cfg.logging.progress), start_step=start)
    signals.install_signal_handlers()
    teacher_before = _fingerprint(engine.teacher) if tr.verify_teacher else None

    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    nmb = tr.num_microbatches
    n_samples = stage.samples_per_prompt if stage.needs_sampling else 1
    batches = iterate_batches(dataset, tr.micro_batch_size // n_samples, nmb, dp_rank, dp, spec.seed, start_step=start,
                              max_steps=tr.max_steps)
    last = {}
    for step, micro in enumerate(batches, start=start):
        t0 = time.time()
        replay = None
        if stage.needs_sampling:
            from zeda_megatron.training.rollout import offloaded, sample

            prompts = [prompts_of(mb, repeat=n_samples) for mb in micro]
            # a CPU generator seeded alike on the ranks of one replica (the sampler draws on every rank)
            gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step * 1009 + dp_rank)
            # KV-cached sampling on the live student; its routing is recorded while sampling and replayed
            # in the training forward. Grad buffers and optimizer state leave the GPU meanwhile.
            with offloaded(engine.ddp, engine.optimizer, enabled=stage.offload_while_sampling):
                rollout = sample(engine.student, prompts, max_new_tokens=stage.max_new_tokens,
                                 temperature=stage.temperature, top_p=stage.top_p,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=gen,
                                 record_routing=stage.router_replay)
            micro, replay = rollout.batches, rollout.replay
        out = train_step(engine, micro, replay=replay, pad_id=tokenizer.pad_id)
        routing = null_metrics(engine)
        elapsed = time.time() - t0
        last = {
            "step": step + 1, "loss": out["loss"], "nll": out["nll"], "kl": out["kl"],
            "group_loss": group_loss(engine, nmb), "null_share": routing["null_share"],
            "null_target": spec.model.null.target_share,
            "expert_flops_removed": routing["expert_flops_removed"],
            "expert_flops_removed_incl_shared": routing["expert_flops_removed_incl_shared"],
            "null_share_per_layer": {str(k): v for k, v in routing["null_share_per_layer"].items()},
            "tokens": out["tokens"], "tokens_per_s": out["tokens"] / max(elapsed, 1e-9),
            "grad_norm": out["grad_norm"], "lr": out["lr"], "step_time_s": elapsed,
        }
        writer.write(step + 1, last)
        wandb.log(last, step + 1)
        progress.update(step + 1, last)
        done = step + 1 == tr.max_steps
        stop = signals.stop_requested_all()
        if done or stop or (tr.save_interval and (step + 1) % tr.save_interval == 0):
            checkpoint.save(engine, step + 1, save_dir, extra={"run_dir": run_dir, "hf_dir": hf_dir, "seed": spec.seed},
                            keep=tr.keep_checkpoints)
        if stop:
            if rank0:
                log.warning("stopping after step %d on signal; resume with trainer.resume=auto", step + 1)
            break
    writer.close()
    wandb.finish()
    summary = {"last": last, "steps_done": last.get("step", start), "run_dir": run_dir, "save_dir": save_dir}
    if tr.verify_teacher:
        summary["teacher_unchanged"] = _all_ranks_true(_fingerprint(engine.teacher) == teacher_before)
    if rank0:
        import json

        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"[zeda] run folder: {run_dir}", flush=True)
    destroy_parallel()
    return last


def main() -> None:
    import hydra

    from zeda_megatron.distributed import hydra_argv

    sys.argv = hydra_argv(sys.argv)

    @hydra.main(config_path="../conf", config_name="config", version_base=None)
    def _main(cfg):
        from zeda_megatron.training import signals

        signals.install_signal_handlers()  # early: a pre-time-limit signal during model building is kept, not fatal
        signals.export_slurm_rank_env()  # a Slurm sweep point's tasks (conf/sweep/slurm.yaml) are its ranks
        run(cfg)
        signals.requeue_if_stopped()  # a sweep point stopped by the pre-time-limit signal resumes after requeue

    _main()


if __name__ == "__main__":
    main()
