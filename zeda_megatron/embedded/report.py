"""Markdown + PNG report of an adaptation run: ``write_report(summary, metrics_jsonl_paths, out_dir)``.

``summary``: the dict of :func:`zeda_megatron.embedded.evaluate.evaluate`; ``metrics_jsonl_paths``:
``{"stage 1": ".../metrics.jsonl", "stage 2": ...}`` (the trainer's per-step logs; missing files are
skipped). Writes ``out_dir/report.md``, ``out_dir/summary.json`` and the PNGs it links.
"""

from __future__ import annotations

import json
import os

CURVE_KEYS = (("loss", "training loss"), ("kl", "KL to teacher"), ("null_share", "null-slot share"))


def _read_jsonl(path: str) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def _fmt(x, pct=False, nd=3):
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(runs: dict[str, list[dict]], out_dir: str) -> list[tuple[str, str]]:
    plt = _plt()
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
    plt = _plt()
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
    runs = {name: _read_jsonl(p) for name, p in (metrics_jsonl_paths or {}).items()}
    runs = {k: v for k, v in runs.items() if v}
    s = summary
    L = ["# ZEDA adaptation report", ""]
    if s.get("teacher_dir"):
        L += [f"Teacher: `{s['teacher_dir']}`  ", f"Adapted (null experts): `{s.get('student_dir', '?')}`", ""]
    L += ["## Expert compute removed", "",
          f"- **Routed expert FLOPs removed: {_fmt(s.get('expert_flops_removed'), pct=True)}** "
          f"(share of the K={s.get('topk', '?')} routed slots per token that went to a null expert)",
          f"- With the always-on shared expert counted: **{_fmt(s.get('expert_flops_removed_incl_shared'), pct=True)}** "
          f"(share x K*F / (K*F + shared F), F={s.get('moe_ffn', '?')}, shared F={s.get('shared_ffn', '?')})",
          f"- E={s.get('num_experts', '?')} real + Z={s.get('num_null_experts', '?')} null experts per MoE layer, "
          f"measured on {s.get('heldout_tokens', '?')} held-out code tokens", ""]
    L += ["## Quality: teacher vs adapted", "",
          "| metric | teacher | adapted |", "|---|---|---|",
          f"| held-out code NLL (nats/token) | {_fmt(s.get('teacher_nll'))} | {_fmt(s.get('student_nll'))} |",
          f"| arithmetic exact match (greedy, {s.get('arith_problems', '?')} problems) | "
          f"{_fmt(s.get('teacher_arith_acc'), pct=True)} | {_fmt(s.get('student_arith_acc'), pct=True)} |",
          "", f"- NLL ratio adapted / teacher: {_fmt(s.get('nll_ratio'))}",
          f"- mean per-token KL(teacher || adapted): {_fmt(s.get('kl_teacher_student'), nd=4)} nats; "
          f"KL(adapted || teacher): {_fmt(s.get('kl_student_teacher'), nd=4)} nats", ""]
    per_layer = s.get("null_share_per_layer") or {}
    L += ["## Null share per MoE layer", "", "| layer | null share |", "|---|---|"]
    L += [f"| {k} | {_fmt(v, pct=True)} |" for k, v in per_layer.items()]
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
        L.append(f"| {k} | {counts.get(k, '?')} | {_fmt(v, pct=True)} |")
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
