"""The trainer's check of a composed config before any process group or model exists.

:func:`validate_config` resolves the config into the run's :class:`~zeda_megatron.spec.RunSpec` (every
value checked there, :mod:`zeda_megatron.spec.resolve`), then checks what needs more than the config:
that the layout fits the GPU (the memory plan) and that the data files read through. Errors are
:class:`~zeda_megatron.spec.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import logging

from zeda_megatron.plan import check_fits
from zeda_megatron.spec import ConfigError, RunSpec, resolve

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "validate_config"]


def validate_config(cfg, world_size: int, check_data: bool = True) -> RunSpec:
    """The run's spec, or a ConfigError for everything that would otherwise fail (or silently misbehave)
    once the job is running. ``check_data`` also reads the data file through (no tokenising)."""
    spec = resolve(cfg, world_size)
    check_fits(spec, error=ConfigError)
    if spec.data.path is not None:
        from zeda_megatron.training.data import check_data_file, data_source_exists

        if not data_source_exists(spec.data.path):
            raise ConfigError(f"data.path={spec.data.path!r} does not exist (a JSONL file or a prepared prefix)")
        if check_data:
            try:
                check_data_file(spec.data.path, spec.data.format, spec.stage.name)
            except ValueError as e:
                raise ConfigError(f"data.path: {e}") from e
    for note in spec.notes:
        log.info("config: %s", note)
    return spec
