"""ZEDA on stock Megatron-Core."""

from zeda_megatron import quiet as _quiet

_quiet.install()
