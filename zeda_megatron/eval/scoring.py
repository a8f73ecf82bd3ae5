"""Scoring a model against its teacher on :mod:`.data`'s held-out sets: the routed null share (overall,
per MoE layer, per token class), expert FLOPs removed, held-out NLL, KL both ways over the full
vocabulary, arithmetic exact match; the compute-dial sweep and calibration to a target null share.

Routing is read by wrapping the ``route`` method of the PlusPlus MoE blocks (the shipped remote code's
``route`` returns ``(logits, weights, index)``; index >= E is a null slot), optionally through a
transform that changes the routing (the training-free baselines). A stock model has no null slots.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zeda_megatron.eval.data import TOKEN_CLASSES, EvalData, encode_chunk, eval_data
from zeda_megatron.eval.models import flops_removed_incl_shared, layer_index, load, moe_sizes, null_blocks, \
    set_null_logit_bias

DEFAULT_DIAL = (-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)
ROW_KEYS = ("expert_flops_removed", "expert_flops_removed_incl_shared", "routed_null_share", "nll", "nll_ratio",
            "kl", "kl_student_teacher", "arith_acc", "arith_agree_teacher")
ARITH_NEW_TOKENS = 6     # the longest answer (3 digits) and a newline fit


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ---- routing: record (and optionally transform) what every null-expert block routes ----------------
@contextmanager
def routing(model, transform=None):
    """Wrap ``route`` of every null-expert block: ``transform(block, (logits, weights, index))`` may
    change the routing (baselines); yields ``records``: {block name: [index tensors, one per call]}."""
    blocks = null_blocks(model)
    records: dict[str, list[torch.Tensor]] = {n: [] for n, _ in blocks}
    saved = [m.__dict__.get("route") for _, m in blocks]  # an instance-level route (patched) or None
    for name, m in blocks:
        orig = m.route

        def wrapped(x, _orig=orig, _name=name, _m=m):
            out = _orig(x)
            if transform is not None:
                out = transform(_m, out)
            records[_name].append(out[2].detach())
            return out

        m.route = wrapped
    try:
        yield records
    finally:
        for (_, m), prev in zip(blocks, saved):
            del m.route
            if prev is not None:
                m.route = prev


# ---- NLL and arithmetic -------------------------------------------------------------------------------
@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[n-1, V] log-probabilities of the next token at every position of ``ids`` (one sequence)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


def sequence_nll(logprobs: torch.Tensor, ids: list[int]) -> float:
    """Summed NLL of ``ids[1:]`` under ``logprobs`` (:func:`token_logprobs` of ``ids``)."""
    return -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


@torch.no_grad()
def heldout_nll(model, tok, texts: list[str], max_len: int = 256) -> float:
    """Mean per-token NLL (nats) of ``bos + text`` over ``texts`` (bos not scored)."""
    model.eval()
    tot, n = 0.0, 0
    for text in texts:
        ids, _ = encode_chunk(tok, text, max_len)
        tot += sequence_nll(token_logprobs(model, ids), ids)
        n += len(ids) - 1
    return tot / max(n, 1)


def unigram_nll(tok, train_texts: list[str], texts: list[str]) -> float:
    """NLL of ``texts`` under the add-one-smoothed unigram distribution of ``train_texts``' tokens."""
    c = Counter()
    for ids in tok(train_texts, add_special_tokens=False)["input_ids"]:
        c.update(ids)
    total = sum(c.values()) + len(tok)
    tot, n = 0.0, 0
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        for i in ids:
            tot -= math.log((c[i] + 1) / total)
            n += 1
    return tot / max(n, 1)


def arith_outputs(model, tok, problems: list[dict], batch_size: int = 100) -> list[str]:
    """The first line of the greedy continuation of every problem's prompt."""
    from zeda_megatron.embedded.hf_model import generate

    outs = generate(model, [p["prompt"] for p in problems], tok=tok, max_new_tokens=ARITH_NEW_TOKENS,
                    batch_size=batch_size)
    return [o.split("\n")[0].strip() for o in outs]


def arith_acc(outputs: list[str], problems: list[dict]) -> float:
    return sum(o == p["answer"] for o, p in zip(outputs, problems)) / max(len(problems), 1)


def arith_accuracy(model, tok, problems: list[dict]) -> float:
    """Greedy exact match on ``problems``."""
    return arith_acc(arith_outputs(model, tok, problems), problems)


# ---- the teacher's reference figures ---------------------------------------------------------------
@dataclass
class TeacherRef:
    logprobs: list[torch.Tensor]       # per chunk [n-1, V]
    nll: float
    arith_acc: float
    arith_outputs: list[str] = field(default_factory=list)


@torch.no_grad()
def teacher_reference(teacher, tok, data: EvalData) -> TeacherRef:
    lps, tot = [], 0.0
    for ids in data.ids:
        lp = token_logprobs(teacher, ids)
        tot += sequence_nll(lp, ids)
        lps.append(lp)
    outs = arith_outputs(teacher, tok, data.problems)
    return TeacherRef(lps, tot / data.n_tokens, arith_acc(outs, data.problems), outs)


# ---- scoring one model (optionally under a routing transform / dial bias) ---------------------------
def null_slots(records: dict, blocks: dict) -> tuple[int, int]:
    """(null slots, routed slots) in ``records`` (bos positions not counted)."""
    null = slots = 0
    for name, lst in records.items():
        for idx in lst:
            null += int((idx[1:] >= blocks[name].num_experts).sum())
            slots += idx[1:].numel()
    return null, slots


@torch.no_grad()
def null_share(model, data: EvalData, transform=None, n_chunks: int | None = None) -> float:
    """Routed null-slot share on the held-out chunks only (cheap: for calibration)."""
    with routing(model, transform) as rec:
        for ids in data.ids[:n_chunks]:
            model(input_ids=torch.tensor([ids]))
    null, slots = null_slots(rec, dict(null_blocks(model)))
    return null / slots if slots else 0.0


@torch.no_grad()
def score(model, tok, data: EvalData, ref: TeacherRef, transform=None, arith: bool = True) -> dict:
    """Figures of ``model`` against the teacher's reference (see the module docstring)."""
    blocks = dict(null_blocks(model))
    nll = kl_ts = kl_st = 0.0
    layer_null, layer_slots = Counter(), Counter()
    cls_null, cls_slots, cls_tokens = Counter(), Counter(), Counter()
    with routing(model, transform) as rec:
        for ids, classes, lt in zip(data.ids, data.classes, ref.logprobs):
            for v in rec.values():
                v.clear()
            ls = token_logprobs(model, ids)
            nll += sequence_nll(ls, ids)
            kl_ts += (lt.exp() * (lt - ls)).sum().item()
            kl_st += (ls.exp() * (ls - lt)).sum().item()
            cls_tokens.update(classes[1:])
            for name, lst in rec.items():
                if not lst:
                    continue
                null = lst[-1] >= blocks[name].num_experts  # [T, K]
                li = layer_index(name)
                layer_null[li] += int(null[1:].sum())
                layer_slots[li] += null[1:].numel()
                per_tok = null.sum(dim=1).tolist()
                for pos in range(1, min(len(per_tok), len(classes))):
                    cls_null[classes[pos]] += per_tok[pos]
                    cls_slots[classes[pos]] += null.shape[1]
        outs = arith_outputs(model, tok, data.problems) if arith else None
    n = data.n_tokens
    share = sum(layer_null.values()) / max(sum(layer_slots.values()), 1)
    return dict(
        routed_null_share=share, expert_flops_removed=share,
        expert_flops_removed_incl_shared=flops_removed_incl_shared(share, model.config) if blocks else 0.0,
        null_share_per_layer={str(li): layer_null[li] / layer_slots[li] for li in sorted(layer_slots)},
        null_share_by_token_class={c: (cls_null[c] / cls_slots[c] if cls_slots[c] else None) for c in TOKEN_CLASSES},
        tokens_by_class={c: cls_tokens[c] for c in TOKEN_CLASSES},
        nll=nll / n, nll_ratio=(nll / n) / ref.nll, kl=kl_ts / n, kl_teacher_student=kl_ts / n,
        kl_student_teacher=kl_st / n,
        arith_acc=arith_acc(outs, data.problems) if outs is not None else None,
        arith_agree_teacher=(sum(a == b for a, b in zip(outs, ref.arith_outputs)) / len(outs)) if outs else None,
    )


def row(method: str, param, res: dict) -> dict:
    """A table row: ``method``, ``param`` and :data:`ROW_KEYS` of a :func:`score` result."""
    return {"method": method, "param": param, **{k: res[k] for k in ROW_KEYS if k in res}}


def sweep_dial(model, tok, data: EvalData, ref: TeacherRef, biases=DEFAULT_DIAL, arith: bool = True,
               log=print) -> list[dict]:
    """The compute dial: one row per bias (sorted), each with :func:`score`'s figures; resets to 0."""
    rows = []
    try:
        for b in sorted(float(x) for x in biases):
            set_null_logit_bias(model, b)
            r = score(model, tok, data, ref, arith=arith)
            rows.append({"bias": b, **{k: r[k] for k in ROW_KEYS if k in r}})
            log(f"[eval] dial {b:+.2f}: null {r['routed_null_share']:.1%}, NLL {r['nll']:.4f}, "
                f"KL {r['kl']:.4f}, arith {pct(r['arith_acc'])}")
    finally:
        set_null_logit_bias(model, 0.0)
    return rows


# ---- calibration to a target null share --------------------------------------------------------------
def bisect(share_at, target: float, lo: float, hi: float, increasing: bool, iters: int) -> float:
    """The parameter in [lo, hi] whose ``share_at(parameter)`` is closest to ``target`` (bisection;
    ``increasing``: the share grows with the parameter)."""
    best = (float("inf"), lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = share_at(mid)
        best = min(best, (abs(s - target), mid))
        if (s < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best[1]


def calibrate_bias(model, data: EvalData, target: float, lo: float = -8.0, hi: float = 8.0,
                   iters: int = 14, n_chunks: int | None = None) -> float:
    """The dial bias whose null share (on the held-out chunks) is closest to ``target``."""

    def share_at(b):
        set_null_logit_bias(model, b)
        return null_share(model, data, n_chunks=n_chunks)

    try:
        return bisect(share_at, target, lo, hi, increasing=True, iters=iters)
    finally:
        set_null_logit_bias(model, 0.0)


# ---- one model, all figures -------------------------------------------------------------------------
def evaluate_model(student, teacher, *, seed: int = 0, n_chunks: int = 48, chunk_chars: int = 600,
                   max_len: int = 256, n_arith: int = 500, dial=DEFAULT_DIAL, log=print,
                   data: EvalData | None = None, ref: TeacherRef | None = None) -> dict:
    """``student``/``teacher``: HF directories or ``(model, tokenizer)`` pairs. Returns the summary:
    the teacher's and the student's figures, the student's routing, and its dial sweep."""
    t_model, t_tok = load(teacher) if isinstance(teacher, str) else teacher
    s_model, s_tok = load(student) if isinstance(student, str) else student
    if len(s_tok) != len(t_tok):
        raise ValueError(f"tokenizers differ: teacher {len(t_tok)} tokens, student {len(s_tok)}")
    data = data or eval_data(t_tok, seed, n_chunks, chunk_chars, max_len, n_arith)
    log(f"[eval] teacher reference: {len(data.ids)} held-out chunks ({data.n_tokens} tokens), "
        f"{len(data.problems)} arithmetic problems")
    ref = ref or teacher_reference(t_model, t_tok, data)
    res = score(s_model, s_tok, data, ref)
    E, K, Fm, shared = moe_sizes(s_model.config)
    blocks = null_blocks(s_model)
    summary = dict(
        student=os.path.abspath(student) if isinstance(student, str) else None,
        teacher=os.path.abspath(teacher) if isinstance(teacher, str) else None,
        heldout_chunks=len(data.ids), heldout_tokens=data.n_tokens, arith_problems=len(data.problems),
        num_experts=E, topk=K, moe_ffn=Fm, shared_ffn=shared,
        num_null_experts=int(blocks[0][1].num_zce) if blocks else 0,
        null_logit_bias=float(getattr(s_model.config, "zce_logit_bias", 0.0) or 0.0),
        teacher_nll=ref.nll, teacher_arith_acc=ref.arith_acc, student_nll=res["nll"],
        student_arith_acc=res["arith_acc"], kl_teacher_student=res["kl_teacher_student"],
        kl_student_teacher=res["kl_student_teacher"], **{k: v for k, v in res.items() if k not in (
            "nll", "arith_acc", "kl", "kl_teacher_student", "kl_student_teacher")},
    )
    summary["null_share"] = summary["routed_null_share"]
    log(f"[eval] student: null {res['routed_null_share']:.1%} of routed slots, NLL {res['nll']:.4f} "
        f"(teacher {ref.nll:.4f}), KL {res['kl']:.4f}, arith {pct(res['arith_acc'])} "
        f"(teacher {pct(ref.arith_acc)})")
    if dial and blocks:
        summary["dial"] = sweep_dial(s_model, s_tok, data, ref, dial, log=log)
    return summary
