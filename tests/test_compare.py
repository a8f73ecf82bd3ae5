"""python -m zeda_megatron.compare: local run folders (trainer runs and slurm/adapt_*.sh runs), the W&B
public API (a stand-in Api object: no network), the table and the Pareto frontier."""

from __future__ import annotations

import json
import os

import yaml

from zeda_megatron import compare


def _trainer_run(d, ratio, w, rows, stage="sft", group="g"):
    os.makedirs(d, exist_ok=True)
    cfg = {"model": {"null_experts": {"ratio": ratio, "num": None, "weight": w}}, "stage": {"name": stage},
           "logging": {"wandb": {"group": group}}}
    with open(os.path.join(d, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump({"last": rows[-1], "steps_done": rows[-1]["step"]}, f)


def _rows(share, kl, nll, tps=(100.0, 200.0, 300.0)):
    return [{"step": i + 1, "null_share": share, "expert_flops_removed": share, "kl": kl, "nll": nll,
             "tokens_per_s": t} for i, t in enumerate(tps)]


def test_local_runs_trainer_and_job_folders(tmp_path):
    _trainer_run(tmp_path / "sweep" / "0", 0.25, 1.0, _rows(0.2, 0.05, 2.0))
    _trainer_run(tmp_path / "sweep" / "1", 0.5, 2.0, _rows(0.45, 0.09, 2.2))
    job = tmp_path / "sweep" / "job"
    os.makedirs(job / "job")
    (job / "job" / "plan.json").write_text(json.dumps({"wandb_group": "g"}))
    _trainer_run(job / "sft", 0.75, 2.0, _rows(0.5, 0.5, 3.0))
    _trainer_run(job / "opd", 0.75, 2.0, _rows(0.6, 0.2, 2.5), stage="opd")
    os.makedirs(job / "eval")
    (job / "eval" / "eval.json").write_text(json.dumps({"routed_null_share": 0.58, "expert_flops_removed": 0.58,
                                                        "kl_teacher_student": 0.11, "student_nll": 2.4,
                                                        "student_arith_acc": 0.3}))
    recs = sorted(compare.find_local_runs([str(tmp_path / "sweep")]), key=compare.sort_key)
    assert [r["run"] for r in recs] == ["0", "1", "job"]  # the job's stage folders are not runs of their own
    assert recs[0]["null_ratio"] == 0.25 and recs[0]["w"] == 1.0
    assert recs[0]["tokens_per_s"] == 250.0  # mean after the first step
    job_rec = recs[2]
    assert job_rec["expert_flops_removed"] == 0.58 and job_rec["kl"] == 0.11 and job_rec["nll"] == 2.4
    assert job_rec["eval.student_arith_acc"] == 0.3
    md = compare.to_markdown(recs)
    assert "| 0.25 | 1 | 20.0% | 20.0% |" in md.replace("1.0 |", "1 |")
    assert md.count("\n") == 5


def test_wandb_runs_by_group_through_the_public_api():
    class Run:
        def __init__(self, name, ratio, share, kl):
            self.name, self.group = name, "sweep-x"
            self.config = {"model": {"null_experts": {"ratio": ratio, "num": None, "weight": 2.0}},
                           "logging": {"wandb": {"group": "sweep-x"}}}
            self.summary = {"_step": 10, "null_share": share, "expert_flops_removed": share, "kl": kl, "nll": 2.0,
                            "tokens_per_s": 1234.0, "eval/student_arith_acc": 0.5}

    class Api:
        def __init__(self):
            self.calls = []

        def runs(self, path, filters=None):
            self.calls.append((path, filters))
            return [Run("a", 0.25, 0.2, 0.1), Run("b", 0.5, 0.4, 0.2)]

    api = Api()
    recs = compare.find_wandb_runs("ent/proj", "sweep-x", api=api)
    assert api.calls == [("ent/proj", {"group": "sweep-x"})]
    assert [(r["run"], r["null_ratio"], r["null_share"], r["tokens_per_s"]) for r in recs] == \
        [("a", 0.25, 0.2, 1234.0), ("b", 0.5, 0.4, 1234.0)]
    assert recs[0]["eval.student_arith_acc"] == 0.5 and recs[0]["steps"] == 10


def test_frontier_keeps_only_undominated_points():
    pts = [(0.1, 3.0), (0.2, 2.0), (0.3, 2.5), (0.4, 2.4), (0.2, 2.1)]
    # (0.1, 3.0) is dominated by (0.2, 2.0); (0.3, 2.5) by (0.4, 2.4); (0.2, 2.1) by (0.2, 2.0)
    assert compare.frontier(pts) == [1, 3]


def test_plot_and_csv(tmp_path):
    recs = [{"run": "a", "null_ratio": 0.25, "w": 2.0, "expert_flops_removed": 0.2, "nll": 2.0, "kl": 0.1},
            {"run": "b", "null_ratio": 0.5, "w": 2.0, "expert_flops_removed": 0.4, "nll": 2.2, "kl": 0.2}]
    png = compare.plot(recs, str(tmp_path / "f.png"), "nll")
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    text = compare.to_csv(recs).splitlines()
    assert text[0].split(",")[:3] == ["run", "null_ratio", "w"] and len(text) == 3
