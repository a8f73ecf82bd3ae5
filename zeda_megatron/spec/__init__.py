"""One typed run specification shared by the trainer, the plan, the rehearsal, generation and the Slurm
job: ``spec = resolve(compose(overrides), world)``; every config error is a :class:`ConfigError` naming
the key."""

from zeda_megatron.spec.compose import CONF_DIR, compose
from zeda_megatron.spec.lookup import ConfigError
from zeda_megatron.spec.resolve import resolve
from zeda_megatron.spec.types import (
    DataSpec, EngineSpec, LayoutSpec, ModelSpec, NullSpec, OptimSpec, RunSpec, StageSpec, TrainerSpec,
)

__all__ = [
    "CONF_DIR", "ConfigError", "DataSpec", "EngineSpec", "LayoutSpec", "ModelSpec", "NullSpec", "OptimSpec",
    "RunSpec", "StageSpec", "TrainerSpec", "compose", "resolve",
]
