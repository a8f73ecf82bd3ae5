"""Megatron-Core glue: null-expert router, dispatchers, MoE layer and spec helpers.

Everything here subclasses stock megatron-core classes and is injected through its module specs;
the ZEDA math itself lives in :mod:`zeda_megatron.routing`.
"""

from zeda_megatron.mcore.config import NullExpertSettings  # noqa: F401
