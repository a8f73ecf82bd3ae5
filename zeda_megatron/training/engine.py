"""The distillation engine's public API, one concern per module:

* :mod:`zeda_megatron.training.build`: :class:`Engine`, :func:`build_engine` (teacher + student,
  DDP, optimizer, scheduler);
* :mod:`zeda_megatron.training.distill`: :class:`CoLocatedDistillation` (student + frozen teacher
  per pipeline stage), :class:`LossSpec`, the last stage's loss;
* :mod:`zeda_megatron.training.step`: :func:`train_step`, :func:`run_schedule`, batches onto the
  device and padded for the layout;
* :mod:`zeda_megatron.training.moe_metrics`: null share, expert FLOPs removed, group loss.

This module re-exports them for callers that import ``zeda_megatron.training.engine``.
"""

from zeda_megatron.training.build import Engine, build_engine, build_models, build_optimizer
from zeda_megatron.training.distill import (
    CoLocatedDistillation,
    LossSpec,
    double_hidden_shapes,
    freeze_teacher,
    loss_func,
    token_losses,
)
from zeda_megatron.training.moe_metrics import group_loss, null_metrics
from zeda_megatron.training.step import model_device, prepare_microbatches, run_schedule, train_step

__all__ = [
    "CoLocatedDistillation", "Engine", "LossSpec", "build_engine", "build_models", "build_optimizer",
    "double_hidden_shapes", "freeze_teacher", "group_loss", "loss_func", "model_device", "null_metrics",
    "prepare_microbatches", "run_schedule", "token_losses", "train_step",
]
