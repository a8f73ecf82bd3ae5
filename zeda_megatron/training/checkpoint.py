"""Student checkpoints: the engine's state (student weights + optimizer: megatron-core dist_checkpointing
under ``engine=megatron``, DeepSpeed's own files under ``engine=deepspeed``; ``Engine.save_state``),
the LR scheduler, the step.

Layout: ``SAVE_DIR/iter_0000020/`` (megatron: a dist_checkpointing directory, which loads under any
layout) with ``zeda_train.json`` (step, scheduler, engine, run facts) and ``SAVE_DIR/latest`` naming
the newest complete one. ``latest`` is replaced atomically after every rank finished writing, so an
interrupted save never hides the previous checkpoint. The teacher is not saved: it is the original
model, rebuilt from its source.

Retention (``trainer.keep_checkpoints``, ``keep`` below): after a save has completed (``latest``
replaced), rank 0 deletes older ``iter_*`` folders so that ``keep`` remain, the one just written
included; never the one just written nor the one ``latest`` names. Folders of later steps (left by a
run resumed from an earlier checkpoint) are not touched. ``keep=0`` keeps everything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch.distributed as dist

LATEST = "latest"
_ITER = re.compile(r"^iter_(\d+)$")
log = logging.getLogger(__name__)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(engine, step: int, save_dir: str, extra: dict | None = None, keep: int = 0) -> str:
    """All ranks call. Returns the checkpoint directory. ``keep`` > 0: then delete older checkpoints
    (rank 0) so that ``keep`` remain (:func:`prune`)."""
    from zeda_megatron.bridge.checkpoint import write_meta

    path = os.path.join(save_dir, f"iter_{step:07d}")
    if _rank0():
        os.makedirs(path, exist_ok=True)
    # model description + tokenizer files, so tools/export_hf.py --checkpoint SAVE_DIR works
    write_meta(engine.student, save_dir, hf_dir=(extra or {}).get("hf_dir"), seed=(extra or {}).get("seed"))
    engine.save_state(path)  # the student and its optimizer, in the engine's own format
    _barrier()
    if _rank0():
        meta = {"step": step, "scheduler": engine.scheduler.state_dict(), "engine": engine.kind,
                **(extra or {})}
        with open(os.path.join(path, "zeda_train.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        tmp = os.path.join(save_dir, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(path))
        os.replace(tmp, os.path.join(save_dir, LATEST))
        if keep:
            prune(save_dir, keep, current=path)
    _barrier()
    return path


def prune(save_dir: str, keep: int, current: str | None = None) -> list[str]:
    """Delete ``iter_*`` folders of ``save_dir`` older than the newest ``keep`` (``current``, the one
    just written, counts as the newest). Never deletes ``current``, the folder ``latest`` names, or
    folders of steps after ``current``'s. Returns the deleted paths. Rank 0 only, after the save."""
    if keep < 1:
        return []
    current = current or latest(save_dir)
    if current is None:
        return []
    spared = {os.path.basename(os.path.normpath(p)) for p in (current, latest(save_dir)) if p}
    m = _ITER.match(os.path.basename(os.path.normpath(current)))
    if m is None:
        return []
    older = sorted((int(mm.group(1)), name) for name in os.listdir(save_dir)
                   if (mm := _ITER.match(name)) and int(mm.group(1)) < int(m.group(1))
                   and os.path.isdir(os.path.join(save_dir, name)))
    doomed = [name for _, name in older[: max(len(older) - (keep - 1), 0)] if name not in spared]
    deleted = []
    for name in doomed:
        path = os.path.join(save_dir, name)
        try:
            shutil.rmtree(path)
            deleted.append(path)
        except OSError as e:  # a failed delete must not fail the run: the next save retries
            log.warning("could not delete old checkpoint %s: %s", path, e)
    if deleted:
        log.info("deleted %d old checkpoint(s) (trainer.keep_checkpoints=%d): %s", len(deleted), keep,
                 ", ".join(os.path.basename(p) for p in deleted))
    return deleted


def latest(save_dir: str) -> str | None:
    marker = os.path.join(save_dir, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return os.path.join(save_dir, f.read().strip())


def resume_path(resume: str, save_dir: str) -> str | None:
    """The checkpoint ``trainer.resume`` asks for: ``auto`` the newest in ``save_dir`` (None: a fresh
    start), ``never`` None (refused when ``save_dir`` already holds checkpoints: nothing is
    overwritten), or a path (its newest iteration when it is a save_dir). Decided before anything is
    written or built."""
    if resume == "never":
        if latest(save_dir):
            raise FileExistsError(
                f"trainer.resume=never but {save_dir} already holds checkpoints: use trainer.resume=auto "
                "to continue that run, or a new hydra.run.dir / trainer.save_dir (nothing was overwritten)"
            )
        return None
    if resume == "auto":
        return latest(save_dir)
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"trainer.resume={resume!r} is not a directory; use auto, never or a checkpoint path")
    return latest(resume) or resume


def load(engine, path: str) -> dict:
    """Restore student weights, optimizer and scheduler from ``path``; returns its metadata."""
    meta_path = os.path.join(path, "zeda_train.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a training checkpoint (no zeda_train.json); check trainer.resume")
    with open(meta_path) as f:
        meta = json.load(f)
    written_by = meta.get("engine", "megatron")  # checkpoints from before the engine was recorded: megatron
    if written_by != engine.kind:
        raise ValueError(f"{path!r} was written by engine={written_by}; resume it with that engine "
                         f"(engine={engine.kind} now), or start from its weights with model.init_checkpoint")
    engine.load_state(path)
    engine.scheduler.load_state_dict(meta["scheduler"])
    return meta


def load_model_only(student, path: str) -> None:
    """Start a student from another run's checkpoint (stage 2 from stage 1): weights only."""
    from megatron.core import dist_checkpointing

    if os.path.isfile(os.path.join(path, LATEST)):
        path = latest(path)
    from zeda_megatron.bridge.ds_weights import is_deepspeed_checkpoint, load_student_weights

    if is_deepspeed_checkpoint(path):  # written by engine=deepspeed
        load_student_weights(student, path)
        return
    sharded = {"model": student.sharded_state_dict()}
    state = dist_checkpointing.load(sharded, path)
    student.load_state_dict(state["model"], strict=True)
