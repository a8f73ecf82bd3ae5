"""Known-harmless library noise, filtered at its source so that real warnings stand out.

Installed by ``import zeda_megatron`` (so every command of the project and every rank gets it); set
``ZEDA_SHOW_ALL_WARNINGS=1`` to see everything. Only these exact messages are dropped:

* megatron-core's import-time ``UserWarning``s about optional packages it falls back from: "Transformer
  Engine and Apex are not installed ...", "Apex is not installed ...", "absl.logging is not installed ..."
  (on a GPU node with Transformer Engine they do not occur);
* megatron-core's "full scope is deprecated" ``UserWarning`` (its own cuda-graph default, every model build)
  and "MimoModelConfig is experimental" (imported on every start);
* torch's ``FutureWarning`` about ``all_gather_into_tensor`` / ``_all_gather_base`` / ``_reduce_scatter_base``
  being deprecated, raised by megatron-core's own calls (nothing this project can change);
* megatron-core's deprecation notices logged on every start: "GPTModel IS DEPRECATED ..." (the
  GPTModel class is what megatron-core 0.19.2's MoE stack is built on) and "MCore's async save is
  deprecated ..." (printed by the synchronous save path too);
* ``SetuptoolsDeprecationWarning``s during ``pip install -e .`` are handled in scripts/setup.sh.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

WARNING_PREFIXES = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "absl.logging is not installed",
    "full scope is deprecated",   # TransformerConfig's cuda-graph scope default, on every model build
    "MimoModelConfig is experimental",   # megatron.core imports its MIMO configs on every start
)
# (message prefix, category): megatron-core's own calls into deprecated torch APIs
OTHER_WARNINGS = (
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
    ("`torch.distributed._all_gather_base` is deprecated", FutureWarning),
    ("`torch.distributed._reduce_scatter_base` is deprecated", FutureWarning),
)
LOG_PREFIXES = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        return not msg.startswith(self.prefixes)


def install() -> None:
    """Add the filters (idempotent; a no-op with ZEDA_SHOW_ALL_WARNINGS=1)."""
    if os.environ.get("ZEDA_SHOW_ALL_WARNINGS", "") not in ("", "0"):
        return
    for prefix in WARNING_PREFIXES:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=UserWarning)
    for prefix, category in OTHER_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
    for name, prefixes in LOG_PREFIXES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
