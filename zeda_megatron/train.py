"""The distillation job: ``python -m zeda_megatron.train model=tiny_qwen3 stage=sft trainer.max_steps=20``.

One process, or several under ``torchrun`` (Slurm: ``srun torchrun ...``, see slurm/). Composed by
Hydra from conf/; the run folder holds the resolved config (config.yaml), ``metrics.jsonl`` (one JSON
object per step), ``summary.json`` and ``checkpoints/``. Everything is checked before any model is built.

:func:`run` composes the parts in order: the run's spec (config resolved and checked) -> tokenizer and
dataset -> process groups -> engine (:mod:`zeda_megatron.training.engine`) -> checkpoint resume -> the
stage's step inputs (:mod:`zeda_megatron.training.stages`) -> one optimizer step each
(:func:`zeda_megatron.training.step.train_step`) -> metrics and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from zeda_megatron.distributed import all_reduce_host

log = logging.getLogger("zeda_megatron.train")


def run(cfg) -> dict:
    """Train per ``cfg`` (a composed config); returns the last step's metrics (rank 0)."""
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from zeda_megatron.distributed import destroy_parallel, init_parallel
    from zeda_megatron.pipeline.state import record_run_end
    from zeda_megatron.training import checkpoint, signals
    from zeda_megatron.training.data import build_dataset, load_tokenizer
    from zeda_megatron.training.engine import build_engine
    from zeda_megatron.training.metrics import RunLog, save_resolved_config
    from zeda_megatron.training.random_init import teacher_hf_dir
    from zeda_megatron.training.stages import build_stage
    from zeda_megatron.training.step import train_step
    from zeda_megatron.training.validate import validate_config

    # everything checked before any process group, model or file: the config, the memory fit, the data
    spec = validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    tokenizer = load_tokenizer(spec.model)
    dataset = build_dataset(spec, tokenizer)  # data errors (file, line, key) before the model
    lay, tr = spec.layout, spec.trainer
    init_parallel(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, seed=spec.seed)
    rank0 = dist.get_rank() == 0
    run_dir, save_dir = _run_folders(spec)
    resume = checkpoint.resume_path(tr.resume, save_dir)  # before anything is written or built
    if rank0:
        save_resolved_config(cfg, run_dir)
    hf_dir = teacher_hf_dir(spec.model, run_dir, spec.seed)
    engine = build_engine(spec, hf_dir)
    start = int(checkpoint.load(engine, resume)["step"]) if resume else 0
    if resume and rank0:
        log.info("resumed from %s at step %d", resume, start)
    logs = RunLog(spec, run_dir, rank0=rank0, start_step=start, config=OmegaConf.to_container(cfg, resolve=True))
    signals.install_signal_handlers()
    teacher_before = _fingerprint(engine.teacher) if tr.verify_teacher else None
    stage = build_stage(spec, dataset, tokenizer, dp_rank=ps.get_data_parallel_rank(),
                        dp_size=ps.get_data_parallel_world_size(), start_step=start)

    inputs, last = stage.steps(engine), {}
    for step in range(start + 1, tr.max_steps + 1):  # 1-based: the number of optimizer steps done after it
        t0 = time.time()
        batch = next(inputs)  # stage 2 samples here, with the student as it is now
        out = train_step(engine, batch.microbatches, replay=batch.replay, pad_id=tokenizer.pad_id)
        last = _step_metrics(engine, spec, out, step, time.time() - t0)
        logs.log(step, last)
        stop = signals.stop_requested_all()
        if step == tr.max_steps or stop or (tr.save_interval and step % tr.save_interval == 0):
            checkpoint.save(engine, step, save_dir, extra={"run_dir": run_dir, "hf_dir": hf_dir, "seed": spec.seed},
                            keep=tr.keep_checkpoints)
        if stop:
            if rank0:
                log.warning("stopping after step %d on signal; resume with trainer.resume=auto", step)
            break
    logs.close()

    summary = {"last": last, "steps_done": last.get("step", start), "run_dir": run_dir, "save_dir": save_dir}
    if tr.verify_teacher:
        summary["teacher_unchanged"] = _all_ranks_true(_fingerprint(engine.teacher) == teacher_before)
    if rank0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        # how the run ended (completed / stopped on which signal), for the phase pipeline's verdict
        record_run_end(run_dir, summary["steps_done"], tr.max_steps, signals.stop_signal_name())
        print(f"[zeda] run folder: {run_dir}", flush=True)
    destroy_parallel()
    return last


def _run_folders(spec) -> tuple[str, str]:
    """(run folder, checkpoint folder) as rank 0 has them: ranks > 0 run Hydra without an output folder
    of their own."""
    dirs = [str(spec.run_dir), str(spec.trainer.save_dir)]
    dist.broadcast_object_list(dirs, src=0)
    return dirs[0], dirs[1]


def _step_metrics(engine, spec, out: dict, step: int, elapsed: float) -> dict:
    """One step's record (metrics.jsonl, W&B, the progress line): the step's sums (``out``), the routing
    over the whole model, throughput and the learning rate. ``elapsed``: the step's wall time, stage
    2's sampling included."""
    from zeda_megatron.training.moe_metrics import group_loss, null_metrics

    routing = null_metrics(engine)
    return {
        "step": step, "loss": out["loss"], "nll": out["nll"], "kl": out["kl"],
        "group_loss": group_loss(engine, spec.trainer.num_microbatches), "null_share": routing["null_share"],
        "null_target": spec.model.null.target_share,
        "expert_flops_removed": routing["expert_flops_removed"],
        "expert_flops_removed_incl_shared": routing["expert_flops_removed_incl_shared"],
        "null_share_per_layer": {str(k): v for k, v in routing["null_share_per_layer"].items()},
        "tokens": out["tokens"], "tokens_per_s": out["tokens"] / max(elapsed, 1e-9),
        "grad_norm": out["grad_norm"], "lr": out["lr"], "step_time_s": elapsed,
    }


def _fingerprint(module) -> str:
    """Exact digest of a module's tensors (this rank's shard): ``trainer.verify_teacher``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if torch.is_tensor(t):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _all_ranks_true(flag: bool) -> bool:
    return int(all_reduce_host(torch.tensor([0 if flag else 1]))) == 0


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
        # a sweep point stopped by the pre-time-limit signal resumes after a requeue
        signals.requeue_if_stopped(cfg.cluster.get("max_requeues"))

    _main()


if __name__ == "__main__":
    main()
