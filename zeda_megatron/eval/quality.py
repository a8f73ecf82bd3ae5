"""The quality frontier across operating points and seeds (``tools/bench_quality.py``): one cell's
figures (ZEDA 1+2 with its compute dial, stage 1 only, null experts without a teacher, static top-k',
top-p, XMoE threshold, all at the adapted model's expert FLOPs), their mean and spread over seeds in
``quality.json``, the goals' verdicts, the table and a frontier plot per metric.

``quality.json``::

    {"teacher": {"nll": .., "arith_acc": ..},
     "points": [{"target_null_share": 0.6,
                 "methods": {"zeda": M, "stage1_only": M, "no_teacher": M, "top_p": M, "threshold": M,
                             "static_topk": M}}, ...]}

with ``M = {"n_seeds": n, "expert_flops_removed": S, "nll": S, "kl": S, "arith_acc": S}`` and
``S = {"mean": .., "std": ..}`` (sample standard deviation over the seeds; 0 for one seed).
"""

from __future__ import annotations

import os
import statistics

from zeda_megatron.eval import baselines as bl
from zeda_megatron.eval import scoring as sc

METHODS = ("zeda", "stage1_only", "no_teacher", "top_p", "threshold", "static_topk")
TRAINING_FREE = ("top_p", "threshold", "static_topk")
METRICS = ("expert_flops_removed", "nll", "kl", "arith_acc")
LABELS = {"zeda": "ZEDA stages 1+2", "stage1_only": "ZEDA stage 1 only", "no_teacher": "null experts, no teacher (NLL)",
          "top_p": "top-p (no training)", "threshold": "threshold / XMoE (no training)",
          "static_topk": "static top-k' (nearest whole k', no training)"}
GOAL_POINT, GOAL_NLL, GOAL_ARITH = 0.6, 0.02, 0.03   # at 60% null: NLL within 2%, arithmetic within 3 points


# ---- one cell: one operating point, one seed ---------------------------------------------------------
def score_cell(zeda, stage1, no_teacher, masked, data, ref, dial, log=print) -> dict:
    """Figures of one (operating point, seed). ``zeda``, ``stage1``, ``no_teacher``: ``(model, tok)`` of
    the trained null-expert models; ``masked``: the teacher as a masked PlusPlus model
    (:func:`zeda_megatron.eval.baselines.masked_teacher`). Every baseline is brought to ZEDA's measured
    null share; static top-k' keeps the whole k' nearest it."""
    res = sc.score(*zeda, data, ref)
    target = res["routed_null_share"]
    free = bl.training_free_rows(*masked, data, ref, target)
    static = free[:-2]
    stage1_rows = bl.trained_rows(LABELS["stage1_only"], *stage1, data, ref, target)
    no_teacher_rows = bl.trained_rows(LABELS["no_teacher"], *no_teacher, data, ref, target)
    cell = dict(zeda=sc.row(LABELS["zeda"], 0.0, res), top_p=free[-2], threshold=free[-1],
                static_topk=min(static, key=lambda r: abs(r["expert_flops_removed"] - target)),
                stage1_only=stage1_rows[1], no_teacher=no_teacher_rows[1],
                own_operating_points=[stage1_rows[0], no_teacher_rows[0]], static_rows=static,
                null_share_per_layer=res["null_share_per_layer"],
                null_share_by_token_class=res["null_share_by_token_class"],
                dial=sc.sweep_dial(*zeda, data, ref, dial, log=log))
    for m in METHODS:
        r = cell[m]
        log(f"[quality]   {LABELS[m]:<46} removed {sc.pct(r['expert_flops_removed'])}, NLL {r['nll']:.4f}, "
            f"KL {r['kl']:.4f}, arith {sc.pct(r['arith_acc'])}")
    return cell


# ---- mean and spread over seeds -------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(teacher: dict, cells: dict) -> dict:
    """``quality.json`` from ``cells``: {target share: [one :func:`score_cell` dict per seed]}."""
    points = []
    for target in sorted(cells):
        runs = cells[target]
        methods = {m: {"n_seeds": len(runs), **{k: spread([r[m][k] for r in runs]) for k in METRICS}}
                   for m in METHODS}
        points.append({"target_null_share": target, "methods": methods})
    return {"teacher": {"nll": teacher["nll"], "arith_acc": teacher["arith_acc"]}, "points": points}


# ---- the goals ------------------------------------------------------------------------------------------
def interpolate(dial: list[dict], x: float, key: str) -> float | None:
    """``key`` of a dial curve at expert FLOPs ``x`` (linear between its points; None outside them)."""
    pts = sorted((r["expert_flops_removed"], r[key]) for r in dial if r.get(key) is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def zeda_at_static(runs: list[dict], key: str) -> float | None:
    """ZEDA's ``key`` at the static top-k' row's FLOPs (each seed's dial interpolated; mean)."""
    vals = [interpolate(r["dial"], r["static_topk"]["expert_flops_removed"], key) for r in runs]
    return None if any(v is None for v in vals) else statistics.fmean(vals)


def verdicts(quality: dict, cells: dict) -> dict:
    """Each goal, per operating point, with the figures it was decided on (means over seeds)."""
    t = quality["teacher"]
    out = {"points": []}
    for p in quality["points"]:
        target, m = p["target_null_share"], p["methods"]
        z = {k: m["zeda"][k]["mean"] for k in METRICS}
        ahead = {}
        for b in TRAINING_FREE:
            ref = {k: m[b][k]["mean"] for k in METRICS}
            mine = z if b != "static_topk" else {k: zeda_at_static(cells[target], k) for k in METRICS[1:]}
            ahead[b] = {k: (None if mine[k] is None else
                            (mine[k] >= ref[k] if k == "arith_acc" else mine[k] < ref[k])) for k in METRICS[1:]}
        out["points"].append(dict(
            target_null_share=target, zeda=z, ahead_of_training_free=ahead,
            kl_closer_than_no_teacher=z["kl"] < m["no_teacher"]["kl"]["mean"],
            nll_vs_teacher=z["nll"] / t["nll"] - 1, arith_vs_teacher_points=100 * (z["arith_acc"] - t["arith_acc"])))
    at = [p for p in out["points"] if abs(p["target_null_share"] - GOAL_POINT) < 1e-9]
    if at:
        g = at[0]
        out["goal_60"] = dict(nll_within_2pct=g["nll_vs_teacher"] <= GOAL_NLL,
                              arith_within_3_points=-g["arith_vs_teacher_points"] <= 100 * GOAL_ARITH)
    out["ahead_everywhere"] = all(v is not False for p in out["points"] for b in p["ahead_of_training_free"].values()
                                  for v in b.values())
    out["kl_closer_than_no_teacher_everywhere"] = all(p["kl_closer_than_no_teacher"] for p in out["points"])
    return out


# ---- the table and the plots ----------------------------------------------------------------------------
def fmt(s: dict, key: str) -> str:
    if key in ("expert_flops_removed", "arith_acc"):
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}%"
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def table_md(quality: dict) -> str:
    t = quality["teacher"]
    lines = [f"Teacher: held-out NLL {t['nll']:.4f}, arithmetic {100 * t['arith_acc']:.1f}%.", "",
             "| target null | method | seeds | routed expert FLOPs removed | NLL | KL(teacher‖model) | arithmetic |",
             "|---|---|---|---|---|---|---|"]
    for p in quality["points"]:
        for m in METHODS:
            s = p["methods"][m]
            lines.append(f"| {100 * p['target_null_share']:.0f}% | {LABELS[m]} | {s['n_seeds']} | "
                         + " | ".join(fmt(s[k], k) for k in METRICS) + " |")
    return "\n".join(lines)


def plot_frontiers(quality: dict, cells: dict, out_dir: str) -> list[str]:
    """One PNG per metric: every method's mean (± std) against expert FLOPs removed, across the
    operating points; ZEDA's compute-dial curves (mean over seeds, per point) dashed; the teacher."""
    from zeda_megatron.eval.report import pyplot

    plt = pyplot()
    titles = {"nll": "held-out NLL (nats/token)", "kl": "KL(teacher ‖ model) (nats/token)",
              "arith_acc": "arithmetic exact match"}
    paths = []
    for key, title in titles.items():
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, m in enumerate(METHODS):
            pts = [(p["methods"][m]["expert_flops_removed"]["mean"], p["methods"][m][key]) for p in quality["points"]]
            ax.errorbar([100 * x for x, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                        fmt="-o" if m == "zeda" else "--" + "osD^v<"[i], ms=5, capsize=3, label=LABELS[m],
                        lw=2.2 if m == "zeda" else 1.2, zorder=3 if m == "zeda" else 2)
        for target, runs in sorted(cells.items()):
            dial = [list(zip(*[(r["expert_flops_removed"], r[key]) for r in run["dial"]])) for run in runs]
            xs = [100 * statistics.fmean(v) for v in zip(*[d[0] for d in dial])]
            ys = [statistics.fmean(v) for v in zip(*[d[1] for d in dial])]
            ax.plot(xs, ys, ":", c="gray", lw=1, label="ZEDA compute dial (per point)" if target == min(cells) else None)
        if key != "kl":
            ax.axhline(quality["teacher"][key], ls="--", c="black", lw=1, label="teacher")
        ax.set_xlabel("routed expert FLOPs removed (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"frontier_{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
