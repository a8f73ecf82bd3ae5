"""Shared by the shipped PlusPlus modeling files (needs only torch; ``zeda_routing`` is
zeda_megatron/routing.py, copied next to it at export).

Compute dial: ``config.zce_logit_bias`` (each MoE block's ``zce_logit_bias`` attribute, settable at
run time) is added to the null experts' router logits before top-k; > 0 sends more slots to null
experts (less expert compute), < 0 fewer; 0 is the model as trained.

Routing counters: every MoE block counts, in inference (``eval()``) forwards, the routed slots it
sent to null experts and all its routed slots (``zce_counts``: a [2] long tensor on the model's
device, no host sync). :func:`routing_stats` reads them; with the environment variable
``ZEDA_ROUTING_STATS=<path>`` set when the model is built, they are written there as JSON when the
process exits (how ``lm_eval`` runs report their null share). Every position of every sequence is
counted, padding included: score with batch size 1 for exact shares.
"""

import atexit
import json
import os

import torch


def num_zce(config) -> int:
    nums = getattr(config, "zce_nums", None) or [0]
    types = getattr(config, "zce_types", None) or ["zero"]
    if any(t != "zero" for t in types):
        raise ValueError(f"zce_types={types}: only 'zero' experts are implemented here")
    if len(set(nums)) != 1:
        raise ValueError(f"zce_nums={nums}: one null-expert count for every MoE layer is supported")
    return int(nums[0])


def add_null_logit_bias(logits, num_real, bias):
    """``logits`` [T, E+Z] with ``bias`` added to the null columns (a new tensor; unchanged if 0)."""
    if not bias or logits.shape[-1] <= num_real:
        return logits
    logits = logits.clone()
    logits[:, num_real:] += float(bias)
    return logits


def count_slots(block, index):
    """Add (null slots, all slots) of ``index`` [T, K] to ``block.zce_counts`` (inference only)."""
    if block.training:
        return
    c = torch.stack([(index >= block.num_experts).sum(), torch.tensor(index.numel(), device=index.device)])
    prev = getattr(block, "zce_counts", None)
    block.zce_counts = c if prev is None else prev + c.to(prev.device)


def routing_stats(model) -> dict:
    """``{"null_share": overall, "null_slots", "slots", "per_layer": {name: share}}`` from the counters."""
    per_layer, null, total = {}, 0, 0
    for name, m in model.named_modules():
        c = getattr(m, "zce_counts", None)
        if c is None or not hasattr(m, "num_zce"):
            continue
        n, t = (int(x) for x in c.tolist())
        per_layer[name] = n / t if t else None
        null, total = null + n, total + t
    return {"null_share": null / total if total else None, "null_slots": null, "slots": total,
            "per_layer": per_layer}


def reset_routing_stats(model) -> None:
    for m in model.modules():
        if hasattr(m, "zce_counts"):
            m.zce_counts = None


def register_stats_file(model) -> None:
    """Write :func:`routing_stats` to ``$ZEDA_ROUTING_STATS`` at exit, when that variable is set."""
    path = os.environ.get("ZEDA_ROUTING_STATS")
    if not path:
        return

    def _write():
        try:
            with open(path, "w") as f:
                json.dump(routing_stats(model), f, indent=1)
        except Exception:  # noqa: BLE001 - never fail the interpreter's exit
            pass

    atexit.register(_write)


def combine_real_experts(x, experts, weights, index, num_real):
    """sum over the chosen slots of weight * expert(x); slots on null experts (index >= num_real)
    are skipped: they contribute exactly zero and cost nothing."""
    out = torch.zeros_like(x)
    for e in torch.unique(index).tolist():
        if e >= num_real:
            continue
        tok, slot = torch.where(index == e)
        out.index_add_(0, tok, experts[e](x[tok]) * weights[tok, slot, None])
    return out
