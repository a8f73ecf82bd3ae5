"""Scoring an adapted model against its teacher (the library behind ``python -m zeda_megatron.evaluate``
and :mod:`zeda_megatron.baselines`): loading exports, routing counters, held-out NLL/KL, arithmetic,
the compute dial, tables and figures. See :mod:`zeda_megatron.evaluate` for what the command reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zeda_megatron.embedded.evaluate import char_class, layer_index  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_CLASSES = ("code_punctuation", "identifiers_keywords", "digits", "whitespace", "prose_other")
DEFAULT_DIAL = (-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)


# ---- loading ------------------------------------------------------------------------------------------
def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def export_checkpoint(ckpt: str, out_dir: str) -> str:
    """Export a megatron-core checkpoint to ``out_dir`` (one process) with tools/export_hf.py."""
    if is_hf_dir(out_dir) and os.path.isfile(os.path.join(out_dir, ".exported_from")) and \
            open(os.path.join(out_dir, ".exported_from")).read() == _ckpt_key(ckpt):
        return out_dir
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), "--checkpoint", ckpt,
                           "--out", out_dir, "--dtype", "float32"], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export of {ckpt} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, ".exported_from"), "w") as f:
        f.write(_ckpt_key(ckpt))
    return out_dir


def _ckpt_key(ckpt: str) -> str:
    latest = os.path.join(ckpt, "latest")
    return os.path.abspath(ckpt) + ":" + (open(latest).read().strip() if os.path.isfile(latest) else "")


def load(path: str):
    """(model in eval mode, fp32, tokenizer) of an HF directory; remote code allowed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), tok


def null_blocks(model) -> list:
    """The null-expert MoE blocks of a PlusPlus model (empty for a stock model)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "route") and hasattr(m, "num_zce")
            and int(getattr(m, "num_zce", 0)) > 0]


def set_null_logit_bias(model, bias: float) -> None:
    """The compute dial: ``bias`` added to the null experts' router logits in every MoE block."""
    for _, m in null_blocks(model):
        m.zce_logit_bias = float(bias)


def moe_sizes(cfg) -> tuple[int, int, int, int]:
    """(E, K, routed expert ffn F, shared ffn size) of an HF config."""
    E = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None) or \
        getattr(cfg, "num_local_experts", None)
    shared = int(cfg.moe_intermediate_size) * int(getattr(cfg, "n_shared_experts", 0) or 0)
    return int(E), int(cfg.num_experts_per_tok), int(cfg.moe_intermediate_size), shared


def flops_removed_incl_shared(share: float, cfg) -> float:
    _, K, Fm, shared = moe_sizes(cfg)
    return share * K * Fm / (K * Fm + shared)


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



# ---- evaluation data and the teacher's reference figures -------------------------------------------
@dataclass
class EvalData:
    ids: list[list[int]]
    classes: list[list[str]]          # per token (position 0 = bos)
    problems: list[dict]
    n_tokens: int = 0


@dataclass
class TeacherRef:
    logprobs: list[torch.Tensor]       # per chunk [n-1, V]
    nll: float
    arith_acc: float
    arith_outputs: list[str] = field(default_factory=list)


def eval_data(tok, seed: int = 0, n_chunks: int = 48, chunk_chars: int = 600, max_len: int = 256,
              n_arith: int = 500) -> EvalData:
    from zeda_megatron.embedded import corpus

    records = corpus.heldout_code_records(seed, n_chunks, chunk_chars)
    ids, classes = [], []
    for r in records:
        enc = tok(r["text"], add_special_tokens=False, return_offsets_mapping=True)
        x = [tok.bos_token_id] + list(enc["input_ids"])[: max_len - 1]
        offs = [tuple(o) for o in enc["offset_mapping"]][: max_len - 1]
        ids.append(x)
        classes.append(["whitespace"] + [char_class(r["text"], r["prose_mask"], a, b) for a, b in offs])
    problems = corpus.arithmetic_problems(n_arith, seed)
    return EvalData(ids, classes, problems, sum(len(x) - 1 for x in ids))


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


def arith_outputs(model, tok, problems: list[dict], batch_size: int = 100) -> list[str]:
    from zeda_megatron.embedded.teacher import generate

    outs = generate(model, [p["prompt"] for p in problems], tok=tok, max_new_tokens=6, batch_size=batch_size)
    return [o.split("\n")[0].strip() for o in outs]


def arith_acc(outputs: list[str], problems: list[dict]) -> float:
    return sum(o == p["answer"] for o, p in zip(outputs, problems)) / max(len(problems), 1)


@torch.no_grad()
def teacher_reference(teacher, tok, data: EvalData) -> TeacherRef:
    lps, tot = [], 0.0
    for ids in data.ids:
        lp = _logprobs(teacher, ids)
        tot += -lp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        lps.append(lp)
    outs = arith_outputs(teacher, tok, data.problems)
    return TeacherRef(lps, tot / data.n_tokens, arith_acc(outs, data.problems), outs)


# ---- scoring one model (optionally under a routing transform / dial bias) ---------------------------
@torch.no_grad()
def null_share(model, data: EvalData, transform=None, n_chunks: int | None = None) -> float:
    """Routed null-slot share on the held-out chunks only (cheap: for calibration)."""
    null = slots = 0
    with routing(model, transform) as rec:
        for ids in data.ids[:n_chunks]:
            model(input_ids=torch.tensor([ids]))
    for name, lst in rec.items():
        E = dict(null_blocks(model))[name].num_experts
        for idx in lst:
            null += int((idx[1:] >= E).sum())  # bos not counted
            slots += idx[1:].numel()
    return null / slots if slots else 0.0


@torch.no_grad()
def score(model, tok, data: EvalData, ref: TeacherRef, transform=None, arith: bool = True) -> dict:
    """Figures of ``model`` (see the module docstring) against the teacher's reference."""
    blocks = dict(null_blocks(model))
    nll = kl_ts = kl_st = 0.0
    layer_null, layer_slots = Counter(), Counter()
    cls_null, cls_slots, cls_tokens = Counter(), Counter(), Counter()
    with routing(model, transform) as rec:
        for ids, classes, lt in zip(data.ids, data.classes, ref.logprobs):
            for v in rec.values():
                v.clear()
            ls = _logprobs(model, ids)
            nll += -ls.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
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


def calibrate_bias(model, data: EvalData, target: float, lo: float = -8.0, hi: float = 8.0,
                   iters: int = 14, n_chunks: int | None = None) -> float:
    """The dial bias whose null share (on the held-out chunks) is closest to ``target`` (bisection:
    the share grows with the bias)."""
    best = (float("inf"), 0.0)
    try:
        for _ in range(iters):
            mid = (lo + hi) / 2
            set_null_logit_bias(model, mid)
            s = null_share(model, data, n_chunks=n_chunks)
            best = min(best, (abs(s - target), mid))
            if s < target:
                lo = mid
            else:
                hi = mid
    finally:
        set_null_logit_bias(model, 0.0)
    return best[1]


ROW_KEYS = ("expert_flops_removed", "expert_flops_removed_incl_shared", "routed_null_share", "nll", "nll_ratio",
            "kl", "kl_student_teacher", "arith_acc", "arith_agree_teacher")


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ---- one model, all figures -------------------------------------------------------------------------
def evaluate_model(student, teacher, *, seed: int = 0, n_chunks: int = 48, chunk_chars: int = 600,
                   max_len: int = 256, n_arith: int = 500, dial=DEFAULT_DIAL, log=print,
                   data: EvalData | None = None, ref: TeacherRef | None = None) -> dict:
    """``student``/``teacher``: HF directories or ``(model, tokenizer)`` pairs. Returns the summary."""
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


# ---- Markdown --------------------------------------------------------------------------------------
def table_md(rows: list[dict], first: str = "method") -> str:
    has_param = any("param" in r for r in rows)
    head = f"| {first} |{' param |' if has_param else ''} expert FLOPs removed (routed) | incl. shared | NLL | " \
           "NLL vs teacher | KL(t‖s) | KL(s‖t) | arithmetic |"
    lines = [head, "|" + "---|" * (9 if has_param else 8)]
    for r in rows:
        name = r.get(first)
        name = f"{name:+.2f}" if isinstance(name, float) else str(name)
        param = (" " + ("" if r.get("param") is None else f"{r['param']:g}") + " |") if has_param else ""
        lines.append(
            f"| {name} |{param} {pct(r.get('expert_flops_removed'))} | {pct(r.get('expert_flops_removed_incl_shared'))} | "
            f"{r['nll']:.4f} | {100 * (r['nll_ratio'] - 1):+.2f}% | {r['kl']:.4f} | "
            f"{r.get('kl_student_teacher', float('nan')):.4f} | {pct(r.get('arith_acc'))} |")
    return "\n".join(lines)


def write_markdown(summary: dict, path: str) -> str:
    s = summary
    out = ["# Evaluation: adapted model vs teacher", ""]
    out += [f"- student: `{s.get('student')}`", f"- teacher: `{s.get('teacher')}`",
            f"- {s['heldout_chunks']} held-out code chunks ({s['heldout_tokens']} tokens), "
            f"{s['arith_problems']} arithmetic problems (greedy exact match)", ""]
    out += ["| | teacher | adapted |", "|---|---|---|",
            f"| routed slots to null experts (= routed expert FLOPs removed) | 0% | {pct(s['routed_null_share'])} |",
            f"| expert FLOPs removed, shared experts counted | 0% | {pct(s['expert_flops_removed_incl_shared'])} |",
            f"| held-out NLL (nats/token) | {s['teacher_nll']:.4f} | {s['student_nll']:.4f} ({100 * (s['nll_ratio'] - 1):+.2f}%) |",
            f"| KL(teacher ‖ adapted) / KL(adapted ‖ teacher) | | {s['kl_teacher_student']:.4f} / {s['kl_student_teacher']:.4f} |",
            f"| arithmetic exact match | {pct(s['teacher_arith_acc'])} | {pct(s['student_arith_acc'])} |", ""]
    if s.get("null_share_per_layer"):
        out += ["Null share per MoE layer: " + ", ".join(f"layer {k}: {pct(v)}" for k, v in s["null_share_per_layer"].items()), ""]
        out += ["Null share by token class: " + ", ".join(
            f"{k}: {pct(v)} ({s['tokens_by_class'][k]} tokens)" for k, v in s["null_share_by_token_class"].items()), ""]
    if s.get("dial"):
        out += ["## Compute dial (bias on the null experts' router logits)", "", table_md(s["dial"], "bias"), ""]
    if s.get("baselines"):
        out += ["## Baselines at matched expert FLOPs", "", table_md(s["baselines"]), ""]
        if s.get("baselines_note"):
            out += [s["baselines_note"], ""]
    if s.get("lm_eval"):
        out += ["## lm-evaluation-harness", "", "```json", json.dumps(s["lm_eval"], indent=1), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))
    return path


# ---- Hydra entry ------------------------------------------------------------------------------------
# ---- the quality-vs-FLOPs figure and the report sections the demo appends ----------------------------
def plot_quality_vs_flops(summary: dict, path: str) -> str | None:
    """KL(teacher || model), NLL and arithmetic against routed expert FLOPs removed: the dial curve
    of the adapted model and every baseline row."""
    dial, rows = summary.get("dial") or [], summary.get("baselines") or []
    if not dial and not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kl", "KL(teacher ‖ model), nats/token"), ("nll", "held-out NLL"), ("arith_acc", "arithmetic exact match")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    markers = "osD^v<>ph*"
    for ax, (key, label) in zip(axes, panels):
        if dial:
            pts = sorted((r["expert_flops_removed"], r[key]) for r in dial if r.get(key) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", c="#1f4e79", lw=2, label="ZEDA + compute dial")
            z = [r for r in dial if r["bias"] == 0.0]
            if z and z[0].get(key) is not None:
                ax.plot([z[0]["expert_flops_removed"]], [z[0][key]], "*", ms=14, c="#c00000", label="trained operating point")
        for i, r in enumerate(rows):
            if r.get(key) is None or r["method"] == "ZEDA stages 1+2":
                continue
            ax.plot([r["expert_flops_removed"]], [r[key]], markers[i % len(markers)], ms=7, label=r["method"])
        if key == "nll" and summary.get("teacher_nll"):
            ax.axhline(summary["teacher_nll"], ls="--", c="gray", lw=1)
        if key == "arith_acc" and summary.get("teacher_arith_acc") is not None:
            ax.axhline(summary["teacher_arith_acc"], ls="--", c="gray", lw=1)
        ax.set_xlabel("routed expert FLOPs removed")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_sections(summary: dict, png: str | None = None) -> str:
    """Markdown: the baseline table and the compute-dial table (+ the figure)."""
    out = []
    if summary.get("baselines"):
        out += ["## Baselines at matched expert FLOPs", "",
                "Each row is brought to the adapted model's routed null share on the held-out chunks "
                "(training-free rows: their parameter bisected; trained null-expert rows: the compute dial). "
                "`param`: k', p, tau or the dial bias.", "",
                table_md(summary["baselines"]), ""]
    if summary.get("dial"):
        out += ["## Compute dial", "",
                "A bias added to the null experts' router logits at inference (`zce_logit_bias` in the exported "
                "config.json): > 0 removes more expert FLOPs, < 0 fewer; 0 is the trained model.", "",
                table_md(summary["dial"], "bias"), ""]
    if png:
        out += [f"![quality vs expert FLOPs]({os.path.basename(png)})", ""]
    return "\n".join(out)
