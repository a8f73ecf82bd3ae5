"""Baselines at matched expert FLOPs against the adapted (ZEDA) model.

    python -m zeda_megatron.evaluate ... evaluate.baselines=true \
        +evaluate.trained.no_teacher=RUN/checkpoints +evaluate.trained.zeda_stage1=SFT/checkpoints

Every row is scored on the same held-out data as the adapted model (:mod:`.scoring`) and brought to
the adapted model's routed null share (its expert FLOPs) on the held-out chunks:

* ``teacher``: the original model (0% removed; the reference).
* ``static top-k``: the original model run with fewer routed experts per token (k' < K, weights
  renormalised over the k' chosen; no training). Only whole k' exist: the row with the FLOPs
  nearest the target (and the ones either side when they differ) are given.
* ``top-p``: "harder tasks need more experts" style dynamic routing over the original router, no
  training: per token keep the fewest of its top-K experts whose normalised gate weights reach a
  cumulative p (the rest are dropped, the kept ones renormalised); p is bisected to the target.
* ``threshold``: XMoE style, no training: keep the top-K experts whose normalised gate weight is at
  least tau (the top-1 always), raw weights (the dropped mass is not given back); tau bisected.
* trained null-expert models (``trained``: name -> HF directory), e.g. null experts trained without
  a teacher (plain NLL), ZEDA stage 1 only: at their own operating point and with the compute dial
  (a bias on the null logits) calibrated to the target share.
* ``ZEDA 1+2``: the adapted model itself (bias 0).

The training-free baselines run on the teacher written as a PlusPlus directory with its null
experts masked (the original routing, bit for bit), the dropped slots marked as null slots so that
the same counters see them. Rows are dicts with :data:`.scoring.ROW_KEYS` plus ``method`` and ``param``.
"""

from __future__ import annotations

import os

import torch

from zeda_megatron.eval import scoring as sc
from zeda_megatron.eval.models import is_hf_dir, load, null_blocks, plusplus_from_teacher, set_null_logit_bias

TEACHER, ZEDA = "teacher", "ZEDA stages 1+2"
STATIC, TOP_P, THRESHOLD = "static top-", "top-p (no training)", "threshold / XMoE (no training)"
OWN, MATCHED = " (own operating point)", " (dial to matched FLOPs)"
TRAINING_FREE = (STATIC, TOP_P, THRESHOLD)


# ---- routing transforms over the original routing -----------------------------------------------------
def _pad_to(weights, index, K, null_id):
    if index.shape[1] == K:
        return weights, index
    pad = K - index.shape[1]
    w = torch.cat([weights, weights.new_zeros(weights.shape[0], pad)], dim=1)
    i = torch.cat([index, index.new_full((index.shape[0], pad), null_id)], dim=1)
    return w, i


def _class_route(block):
    return type(block).route.__get__(block)


def static_topk(k: int):
    """Route with ``k`` experts per token instead of K (the model's own top-k, renormalised); needs
    the block's input (:func:`route_with_input`)."""

    def transform(block, out):
        K = block.top_k
        block.top_k = k
        try:
            logits, w, idx = _class_route(block)(out[3])
        finally:
            block.top_k = K
        w, idx = _pad_to(w, idx, K, block.num_experts)
        return logits, w, idx

    return transform


def _sorted(w, idx):
    order = torch.argsort(w.float(), dim=1, descending=True)
    return torch.gather(w, 1, order), torch.gather(idx, 1, order)


def _keep_slots(keep_of, renormalise: bool):
    """A route transform: the K slots sorted by weight, those ``keep_of(weights, total)`` says no to
    (the top one always stays) zeroed and marked as null slots; ``renormalise`` keeps the total weight."""

    def transform(block, out):
        logits, w, idx = out[:3]
        w, idx = _sorted(w, idx)
        total = w.sum(dim=1, keepdim=True)
        keep = keep_of(w, total)
        keep[:, 0] = True
        w2 = torch.where(keep, w, torch.zeros_like(w))
        if renormalise:
            w2 = w2 * total / w2.sum(dim=1, keepdim=True).clamp_min(1e-20)
        return logits, w2, torch.where(keep, idx, torch.full_like(idx, block.num_experts))

    return transform


def top_p(p: float, renormalise: bool = True):
    """Keep the fewest top experts whose normalised weights sum to >= p (top-1 always)."""

    def keep_of(w, total):
        cum = torch.cumsum(w, dim=1) / total.clamp_min(1e-20)
        keep = torch.ones_like(w, dtype=torch.bool)
        keep[:, 1:] = cum[:, :-1] < p
        return keep

    return _keep_slots(keep_of, renormalise)


def threshold(tau: float, renormalise: bool = False):
    """Keep the experts whose normalised weight is >= tau (top-1 always)."""
    return _keep_slots(lambda w, total: (w / total.clamp_min(1e-20)) >= tau, renormalise)


def route_with_input(model) -> None:
    """Patch each null block's ``route`` so that its output carries its input as a 4th element."""
    for _, m in null_blocks(model):
        if getattr(m, "route_keeps_input", False):
            continue
        orig = _class_route(m)

        def route(x, _orig=orig):
            return (*_orig(x), x)

        m.route = route
        m.route_keeps_input = True


def unpatch(model) -> None:
    """Undo :func:`route_with_input`."""
    for _, m in null_blocks(model):
        if getattr(m, "route_keeps_input", False):
            del m.route
            m.route_keeps_input = False


def strip(transform):
    """Wrap a transform so that the model sees a 3-tuple again."""

    def t(block, out):
        res = transform(block, out) if transform is not None else out
        return res[:3]

    return t


# ---- calibration ------------------------------------------------------------------------------------
def bisect_param(model, data, make, target: float, lo: float, hi: float, increasing: bool,
                 iters: int = 12, n_chunks: int | None = None) -> float:
    """The parameter in [lo, hi] whose transform ``make(parameter)``'s null share is closest to ``target``."""
    return sc.bisect(lambda v: sc.null_share(model, data, transform=strip(make(v)), n_chunks=n_chunks),
                     target, lo, hi, increasing, iters)


# ---- the rows -----------------------------------------------------------------------------------------
def static_ks(K: int, target: float) -> list[int]:
    """The whole k' (1..K-1) whose FLOPs are nearest ``target`` (one or two values)."""
    return sorted({max(1, min(K - 1, int(k))) for k in (round(K * (1 - target)), int(K * (1 - target)),
                                                        int(K * (1 - target)) + 1)})


def masked_teacher(teacher_dir: str, work_dir: str):
    """(model, tokenizer) of the teacher as a PlusPlus model with its null experts masked, its route
    patched for the transforms (:func:`route_with_input`); written once into ``work_dir``."""
    pp_dir = os.path.join(work_dir, "teacher_plusplus")
    if not is_hf_dir(pp_dir):
        plusplus_from_teacher(teacher_dir, pp_dir, num_null=1, mask_null=True)
    pp, tok = load(pp_dir)
    route_with_input(pp)
    return pp, tok


def training_free_rows(pp, pp_tok, data, ref, target: float, calib_chunks: int | None = 16) -> list[dict]:
    """Static top-k' (nearest whole k'), top-p and threshold rows at ``target`` on the masked teacher."""
    K = int(pp.config.num_experts_per_tok)
    rows = [sc.row(f"{STATIC}{k} (of {K})", k, sc.score(pp, pp_tok, data, ref, transform=strip(static_topk(k))))
            for k in static_ks(K, target)]
    p = bisect_param(pp, data, top_p, target, 0.0, 1.0, increasing=False, n_chunks=calib_chunks)
    rows.append(sc.row(TOP_P, round(p, 4), sc.score(pp, pp_tok, data, ref, transform=strip(top_p(p)))))
    tau = bisect_param(pp, data, threshold, target, 0.0, 1.0, increasing=True, n_chunks=calib_chunks)
    rows.append(sc.row(THRESHOLD, round(tau, 4), sc.score(pp, pp_tok, data, ref, transform=strip(threshold(tau)))))
    return rows


def trained_rows(name: str, model, tok, data, ref, target: float, calib_chunks: int | None = 16) -> list[dict]:
    """A trained null-expert model at its own operating point and dialled to ``target``."""
    rows = [sc.row(name + OWN, 0.0, sc.score(model, tok, data, ref))]
    b = sc.calibrate_bias(model, data, target, n_chunks=calib_chunks)
    set_null_logit_bias(model, b)
    try:
        rows.append(sc.row(name + MATCHED, round(b, 4), sc.score(model, tok, data, ref)))
    finally:
        set_null_logit_bias(model, 0.0)
    return rows


def baseline_table(teacher_dir: str, student, *, trained: dict | None = None, data=None, ref=None,
                   teacher_model=None, work_dir: str = ".", target: float | None = None,
                   calib_chunks: int | None = 16, log=print) -> list[dict]:
    """Rows (see the module docstring), ZEDA 1+2 last. ``student``: HF dir or (model, tok)."""
    t_model, t_tok = teacher_model or load(teacher_dir)
    data = data or sc.eval_data(t_tok)
    ref = ref or sc.teacher_reference(t_model, t_tok, data)
    s_model, s_tok = load(student) if isinstance(student, str) else student
    zeda = sc.score(s_model, s_tok, data, ref)
    target = zeda["routed_null_share"] if target is None else target
    log(f"[baselines] target routed null share {target:.1%} (the adapted model's)")
    rows = [sc.row(TEACHER, None, sc.score(t_model, t_tok, data, ref))]
    pp, pp_tok = masked_teacher(teacher_dir, work_dir)
    rows += training_free_rows(pp, pp_tok, data, ref, target, calib_chunks)
    del pp
    for name, path in (trained or {}).items():
        m, tk = load(path) if isinstance(path, str) else path
        rows += trained_rows(name, m, tk, data, ref, target, calib_chunks)
    rows.append(sc.row(ZEDA, 0.0, zeda))
    for r in rows:
        log(f"[baselines] {r['method']:<40} removed {sc.pct(r['expert_flops_removed'])}, NLL {r['nll']:.4f}, "
            f"KL {r['kl']:.4f}, arith {sc.pct(r.get('arith_acc'))}")
    return rows


def zeda_ahead(rows: list[dict], tol: float = 0.03) -> dict:
    """Per training-free baseline within ``tol`` of ZEDA's FLOPs: is ZEDA's KL lower (and NLL)?"""
    z = rows[-1]
    out = {}
    for r in rows:
        if r["method"].startswith(TRAINING_FREE) and abs(r["expert_flops_removed"] - z["expert_flops_removed"]) <= tol:
            out[r["method"]] = dict(kl=z["kl"] < r["kl"], nll=z["nll"] < r["nll"],
                                    arith=(z.get("arith_acc") or 0) >= (r.get("arith_acc") or 0))
    return out
