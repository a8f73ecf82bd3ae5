"""Compare the runs of a sweep: a table and the quality-vs-expert-FLOPs frontier.

    python -m zeda_megatron.compare runs/sweeps/ratios                 # local run folders (any depth)
    python -m zeda_megatron.compare --wandb ENTITY/PROJECT --group ratios   # W&B public API
    ... [--format markdown|csv] [--out table.md] [--png frontier.png] [--quality nll|kl|<eval key>]

A run is a trainer run folder (config.yaml + metrics.jsonl / summary.json, e.g. one point of
``python -m zeda_megatron.train -m +sweep=local ...``) or a slurm/adapt_*.sh run folder (job/plan.json;
its stage-2 metrics and its evaluation in eval/eval.json). Columns: null ratio (Z/E), w (group-loss
weight), null share (routed slots sent to null experts), expert FLOPs removed (routed-expert work;
from the evaluation when there is one, else the last training step), KL, NLL, evaluation scores,
tokens/s (mean over the training steps after the first). The PNG plots quality (lower is better,
``--quality``) against expert FLOPs removed and joins the Pareto-optimal runs (the frontier).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys

from zeda_megatron.pipeline.state import read_json
from zeda_megatron.training.metrics import read_metrics

EVAL_KEYS = ("student_arith_acc", "teacher_arith_acc", "nll_ratio", "kl_student_teacher")  # beside KL/NLL columns


# ---- reading runs ------------------------------------------------------------------------------------
def _read_yaml(path):
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, ValueError):
        return None


def _get(d, path, default=None):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _null_ratio(cfg: dict) -> float | None:
    nx = _get(cfg, "model.null_experts") or {}
    if nx.get("num") is not None:
        hf = _get(cfg, "model.hf_config") or {}
        e = hf.get("n_routed_experts") or hf.get("num_experts")
        return float(nx["num"]) / float(e) if e else None
    return float(nx["ratio"]) if nx.get("ratio") is not None else None


def _mean_tps(rows: list[dict]) -> float | None:
    v = [r["tokens_per_s"] for r in rows[1:] if isinstance(r.get("tokens_per_s"), (int, float))]
    if not v:
        v = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    return sum(v) / len(v) if v else None


def _eval_of(folder: str) -> dict | None:
    for p in (os.path.join(folder, "eval", "eval.json"), os.path.join(folder, "eval.json"),
              os.path.join(folder, "eval", "summary.json")):
        e = read_json(p)
        if isinstance(e, dict):
            return e
    return None


def record(name: str, cfg: dict, rows: list[dict], summary: dict | None, ev: dict | None, group=None) -> dict:
    last = (summary or {}).get("last") or (rows[-1] if rows else {})
    rec = {
        "run": name,
        "group": group or _get(cfg, "logging.wandb.group"),
        "stage": _get(cfg, "stage.name"),
        "null_ratio": _null_ratio(cfg),
        "w": _get(cfg, "model.null_experts.weight"),
        "steps": last.get("step"),
        "null_share": last.get("null_share"),
        "expert_flops_removed": last.get("expert_flops_removed"),
        "kl": last.get("kl"),
        "nll": last.get("nll"),
        "tokens_per_s": _mean_tps(rows),
    }
    if ev:
        rec["null_share"] = ev.get("routed_null_share", ev.get("null_share", rec["null_share"]))
        rec["expert_flops_removed"] = ev.get("expert_flops_removed", rec["expert_flops_removed"])
        if "kl_teacher_student" in ev:
            rec["kl"] = ev["kl_teacher_student"]
        if "student_nll" in ev:
            rec["nll"] = ev["student_nll"]
        for k in EVAL_KEYS:
            if k in ev and isinstance(ev[k], (int, float)):
                rec[f"eval.{k}"] = ev[k]
    return rec


def find_local_runs(paths: list[str]) -> list[dict]:
    """Every run under ``paths`` (a run folder itself, or folders holding them)."""
    out, seen = [], set()
    for top in paths:
        if not os.path.isdir(top):
            raise SystemExit(f"compare: {top!r} is not a folder")
        for root, dirs, files in os.walk(top):
            if os.path.realpath(root) in seen:
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "wandb", "checkpoints")))
            if os.path.isfile(os.path.join(root, "job", "plan.json")):  # a slurm/adapt_*.sh run
                plan = read_json(os.path.join(root, "job", "plan.json")) or {}
                stage_dir = next((os.path.join(root, s) for s in ("opd", "sft")
                                  if os.path.isfile(os.path.join(root, s, "config.yaml"))), None)
                seen.add(os.path.realpath(root))
                if stage_dir:
                    cfg = _read_yaml(os.path.join(stage_dir, "config.yaml")) or {}
                    out.append(record(os.path.relpath(root, top) if root != top else os.path.basename(root.rstrip("/")),
                                      cfg, read_metrics(stage_dir), read_json(os.path.join(stage_dir, "summary.json")),
                                      _eval_of(root), group=plan.get("wandb_group")))
                dirs[:] = []
                continue
            if "config.yaml" in files and ("metrics.jsonl" in files or "summary.json" in files):
                seen.add(os.path.realpath(root))
                cfg = _read_yaml(os.path.join(root, "config.yaml")) or {}
                name = os.path.relpath(root, top) if root != top else os.path.basename(os.path.normpath(root))
                out.append(record(name, cfg, read_metrics(root), read_json(os.path.join(root, "summary.json")),
                                  _eval_of(root)))
    return out


def find_wandb_runs(path: str, group: str | None, api=None) -> list[dict]:
    """Runs of ``entity/project`` (optionally one group) through the W&B public API."""
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": group} if group else {}
    out = []
    for run in api.runs(path, filters=filters):
        cfg = dict(run.config)
        s = dict(run.summary)
        last = {k: s.get(k) for k in ("step", "null_share", "expert_flops_removed", "kl", "nll", "loss")}
        last["step"] = s.get("_step", s.get("step"))
        ev = {k.split("/", 1)[1]: v for k, v in s.items() if k.startswith("eval/")} or None
        rec = record(run.name, cfg, [], {"last": last}, ev, group=getattr(run, "group", None))
        rec["tokens_per_s"] = s.get("tokens_per_s")
        out.append(rec)
    return out


# ---- output --------------------------------------------------------------------------------------------
COLUMNS = [("run", "run"), ("null_ratio", "null ratio"), ("w", "w"), ("null_share", "null share"),
           ("expert_flops_removed", "expert FLOPs removed"), ("kl", "KL"), ("nll", "NLL")]


def columns(recs: list[dict]) -> list[tuple[str, str]]:
    extra = sorted({k for r in recs for k in r if k.startswith("eval.")})
    return COLUMNS + [(k, k) for k in extra] + [("tokens_per_s", "tokens/s")]


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("null_share", "expert_flops_removed") and isinstance(v, (int, float)):
        return f"{v:.1%}"
    if key == "tokens_per_s" and isinstance(v, (int, float)):
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sort_key(r: dict):
    return (r.get("null_ratio") is None, r.get("null_ratio") or 0.0, r.get("w") or 0.0, str(r["run"]))


def to_markdown(recs: list[dict]) -> str:
    cols = columns(recs)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in recs:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(recs: list[dict]) -> str:
    cols = columns(recs)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([k for k, _ in cols])
    for r in recs:
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _ in cols])
    return buf.getvalue()


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points (more FLOPs removed, lower quality loss), by FLOPs removed."""
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def plot(recs: list[dict], path: str, quality: str = "nll") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, labels = [], []
    for r in recs:
        x, y = r.get("expert_flops_removed"), r.get(quality)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            pts.append((float(x), float(y)))
            labels.append(f"{r['run']} (r={_fmt('', r.get('null_ratio'))}, w={_fmt('', r.get('w'))})")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if pts:
        ax.scatter([100 * x for x, _ in pts], [y for _, y in pts], color="tab:blue", zorder=3)
        for (x, y), lab in zip(pts, labels):
            ax.annotate(lab, (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        f = frontier(pts)
        ax.plot([100 * pts[i][0] for i in f], [pts[i][1] for i in f], color="tab:red", lw=1.5, label="frontier", zorder=2)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no run has both expert FLOPs removed and {quality}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("routed expert FLOPs removed (%)")
    ax.set_ylabel(f"{quality} (lower is better)")
    ax.set_title("quality vs expert FLOPs removed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="run folders or folders holding runs (a sweep folder)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead (public API)")
    p.add_argument("--group", help="W&B group (with --wandb); all of the project's runs without it")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--out", help="write the table here too")
    p.add_argument("--png", help="frontier plot (default: <first folder>/frontier.png, or ./frontier-<group>.png)")
    p.add_argument("--quality", default="nll", help="y axis of the plot: nll, kl or an eval.* column (lower is better)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if bool(args.paths) == bool(args.wandb):
        print("compare: give run folders, or --wandb ENTITY/PROJECT [--group G]", file=sys.stderr)
        return 2
    recs = find_wandb_runs(args.wandb, args.group) if args.wandb else find_local_runs(args.paths)
    if not recs:
        print("compare: no runs found", file=sys.stderr)
        return 1
    recs.sort(key=sort_key)
    table = to_csv(recs) if args.format == "csv" else to_markdown(recs)
    sys.stdout.write(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    png = args.png or (os.path.join(args.paths[0], "frontier.png") if args.paths else f"frontier-{args.group or 'runs'}.png")
    plot(recs, png, args.quality)
    print(f"\n{len(recs)} runs; frontier plot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
