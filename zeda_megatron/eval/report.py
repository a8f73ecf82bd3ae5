"""Reports of an evaluation: the Markdown of ``python -m zeda_megatron.evaluate`` (``eval.md``), the
adaptation report of the embedded demo (``report.md`` + PNGs: routing, token classes, training
curves) and the quality-vs-expert-FLOPs figure with the baseline and compute-dial tables.

``write_report(summary, metrics_jsonl_paths, out_dir)``: ``summary`` is
:func:`zeda_megatron.eval.scoring.evaluate_model`'s dict; ``metrics_jsonl_paths``:
``{"stage 1": ".../metrics.jsonl", "stage 2": ...}`` (the trainer's per-step logs; missing files are
skipped). Writes ``out_dir/report.md``, ``out_dir/summary.json`` and the PNGs it links.
"""

from __future__ import annotations

import json
import os

from zeda_megatron.eval.scoring import pct
from zeda_megatron.training.metrics import read_metrics_file

CURVE_KEYS = (("loss", "training loss"), ("kl", "KL to teacher"), ("null_share", "null-slot share"))


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- the evaluate command's Markdown ---------------------------------------------------------------
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


# ---- the adaptation report ----------------------------------------------------------------------
def _fmt(x, as_pct=False, nd=3):
    if x is None or as_pct:
        return pct(x)
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _curves(runs: dict[str, list[dict]], out_dir: str) -> list[tuple[str, str]]:
    plt = pyplot()
    pngs = []
    for key, title in CURVE_KEYS:
        series = {name: [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and "step" in r]
                  for name, recs in runs.items()}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        offset = 0
        for name, pts in series.items():  # stages one after another on one axis
            xs = [offset + s for s, _ in pts]
            ax.plot(xs, [v for _, v in pts], label=name)
            offset = xs[-1]
        if key == "null_share":
            tgt = [r.get("null_target") for recs in runs.values() for r in recs if r.get("null_target") is not None]
            if tgt:
                ax.axhline(tgt[-1], ls="--", c="gray", lw=1, label=f"target {tgt[-1]:.2f}")
        ax.set_xlabel("step (stages concatenated)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fn = f"curve_{key}.png"
        fig.savefig(os.path.join(out_dir, fn), dpi=100)
        plt.close(fig)
        pngs.append((title, fn))
    return pngs


def _bars(values: dict, title: str, ylabel: str, fn: str, out_dir: str, ref: float | None = None) -> str | None:
    items = [(k, v) for k, v in values.items() if v is not None]
    if not items:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar([str(k) for k, _ in items], [v for _, v in items], color="#4a7fb5")
    if ref is not None:
        ax.axhline(ref, ls="--", c="gray", lw=1, label=f"overall {ref:.2f}")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fn), dpi=100)
    plt.close(fig)
    return fn


def write_report(summary: dict, metrics_jsonl_paths: dict[str, str] | None, out_dir: str) -> str:
    """Write ``report.md`` (+ PNGs, + ``summary.json``) into ``out_dir``; returns the report path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    runs = {name: read_metrics_file(p) if p else [] for name, p in (metrics_jsonl_paths or {}).items()}
    runs = {k: v for k, v in runs.items() if v}
    s = summary
    L = ["# ZEDA adaptation report", ""]
    if s.get("teacher_dir"):
        L += [f"Teacher: `{s['teacher_dir']}`  ", f"Adapted (null experts): `{s.get('student_dir', '?')}`", ""]
    L += ["## Expert compute removed", "",
          f"- **Routed expert FLOPs removed: {_fmt(s.get('expert_flops_removed'), as_pct=True)}** "
          f"(share of the K={s.get('topk', '?')} routed slots per token that went to a null expert)",
          f"- With the always-on shared expert counted: **{_fmt(s.get('expert_flops_removed_incl_shared'), as_pct=True)}** "
          f"(share x K*F / (K*F + shared F), F={s.get('moe_ffn', '?')}, shared F={s.get('shared_ffn', '?')})",
          f"- E={s.get('num_experts', '?')} real + Z={s.get('num_null_experts', '?')} null experts per MoE layer, "
          f"measured on {s.get('heldout_tokens', '?')} held-out code tokens", ""]
    L += ["## Quality: teacher vs adapted", "",
          "| metric | teacher | adapted |", "|---|---|---|",
          f"| held-out code NLL (nats/token) | {_fmt(s.get('teacher_nll'))} | {_fmt(s.get('student_nll'))} |",
          f"| arithmetic exact match (greedy, {s.get('arith_problems', '?')} problems) | "
          f"{_fmt(s.get('teacher_arith_acc'), as_pct=True)} | {_fmt(s.get('student_arith_acc'), as_pct=True)} |",
          "", f"- NLL ratio adapted / teacher: {_fmt(s.get('nll_ratio'))}",
          f"- mean per-token KL(teacher || adapted): {_fmt(s.get('kl_teacher_student'), nd=4)} nats; "
          f"KL(adapted || teacher): {_fmt(s.get('kl_student_teacher'), nd=4)} nats", ""]
    per_layer = s.get("null_share_per_layer") or {}
    L += ["## Null share per MoE layer", "", "| layer | null share |", "|---|---|"]
    L += [f"| {k} | {_fmt(v, as_pct=True)} |" for k, v in per_layer.items()]
    fn = _bars(per_layer, "null-slot share per MoE layer", "null share", "null_share_per_layer.png", out_dir,
               s.get("null_share"))
    if fn:
        L += ["", f"![null share per layer]({fn})"]
    L += [""]
    by_cls = s.get("null_share_by_token_class") or {}
    counts = s.get("tokens_by_class") or {}
    L += ["## Which tokens skip most", "",
          "Held-out tokens by class (prose = inside comments/docstrings/strings); null share = share of "
          "their routed slots sent to null experts.", "", "| token class | tokens | null share |", "|---|---|---|"]
    for k, v in sorted(by_cls.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1)):
        L.append(f"| {k} | {counts.get(k, '?')} | {_fmt(v, as_pct=True)} |")
    fn = _bars(by_cls, "null-slot share by token class", "null share", "null_share_by_token_class.png", out_dir,
               s.get("null_share"))
    if fn:
        L += ["", f"![null share by token class]({fn})"]
    L += [""]
    L += ["## Training curves", ""]
    if runs:
        for name, recs in runs.items():
            last = recs[-1]
            L.append(f"- {name}: {len(recs)} steps; last: " + ", ".join(
                f"{k} {_fmt(last[k], nd=4)}" for k, _ in CURVE_KEYS if isinstance(last.get(k), (int, float))))
        L.append("")
        for title, png in _curves(runs, out_dir):
            L += [f"![{title}]({png})", ""]
    else:
        L += ["(no metrics.jsonl given)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


# ---- the quality-vs-FLOPs figure and the report sections the demo appends ----------------------------
def plot_quality_vs_flops(summary: dict, path: str) -> str | None:
    """KL(teacher || model), NLL and arithmetic against routed expert FLOPs removed: the dial curve
    of the adapted model and every baseline row."""
    dial, rows = summary.get("dial") or [], summary.get("baselines") or []
    if not dial and not rows:
        return None
    plt = pyplot()
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
