"""The one entry that builds a training engine for this rank from the run's spec: megatron-core's
DDP + optimizer (:func:`zeda_megatron.training.build.build_megatron_engine`) or DeepSpeed ZeRO
(:func:`zeda_megatron.training.ds_engine.build_ds_engine`), per ``spec.engine``. The trainer and the
rehearsal call it; call after :func:`zeda_megatron.distributed.init_parallel`."""

from __future__ import annotations

from zeda_megatron.spec import RunSpec


def build_engine(spec: RunSpec, hf_dir: str | None = None):
    """Teacher + student (weights from ``hf_dir``, default ``spec.model.hf_dir``), the student's
    wrapper, optimizer and LR schedule."""
    hf_dir = hf_dir or spec.model.hf_dir
    if not hf_dir:
        raise ValueError("build_engine needs the original model's HF folder (model.hf_dir, or hf_dir=...)")
    if spec.engine.deepspeed:
        from zeda_megatron.training.ds_engine import build_ds_engine

        return build_ds_engine(spec, hf_dir)
    from zeda_megatron.training.build import build_megatron_engine

    return build_megatron_engine(spec, hf_dir)
