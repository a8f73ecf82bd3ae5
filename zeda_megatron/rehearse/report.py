"""The rehearsal's report: one rank's ``part | planned | measured | ratio`` table and the JSON line
(``python -m zeda_megatron.rehearse`` and the Slurm job's rehearse phase print both)."""

from __future__ import annotations

import json

GiB = 2**30


def format_rank(row: dict) -> str:
    if "error" in row:
        return f"rank {row['rank']}: FAILED: {row['error']}"
    lines = [f"rank {row['rank']}", "| part | planned GiB | measured GiB | ratio |", "|---|---:|---:|---:|"]
    for part, planned in row["planned_bytes"].items():
        measured = row["measured_bytes"][part]
        if not planned and not measured:
            continue
        ratio = f"{row['ratios'][part]:.3f}" if planned else "-"
        lines.append(f"| {part} | {planned / GiB:.2f} | {measured / GiB:.2f} | {ratio} |")
    lines.append(f"| **peak** (without the {row['reserve'] / GiB:.2f} GiB reserve) | {row['planned_peak'] / GiB:.2f} "
                 f"| {row['measured_peak'] / GiB:.2f} | {row['peak_ratio']:.3f} |")
    verdict = {True: "fits", False: "DOES NOT FIT", None: "(no GPU size to check)"}[row["fits"]]
    bounds = f"; out of bounds: {', '.join(row['out_of_bounds'])}" if row["out_of_bounds"] else ""
    return "\n".join(lines) + f"\n{verdict}{bounds}"


def json_line(report: dict) -> str:
    keep = ("rank", "planned_bytes", "measured_bytes", "planned_peak", "measured_peak", "fits", "error", "wall_s")
    ranks = [{k: r[k] for k in keep if k in r} for r in report["ranks"]]
    return json.dumps({"ranks": ranks, "fits": report["fits"], "within_bounds": report["within_bounds"],
                       "plan_fits": report["plan_fits"], "null_share": report["null_share"],
                       "failures": report["failures"], "wall_s": round(report["wall_s"], 1)})
