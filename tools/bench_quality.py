#!/usr/bin/env python
"""The quality frontier of ZEDA on the embedded default, against every baseline, over seeds.

    python tools/bench_quality.py                     # the full run: 4 points x 3 seeds (50 min on 2 cores)
    python tools/bench_quality.py --preset test --points 0.5 0.6 --seeds 0 1 --sft-steps 4 --opd-steps 2 \\
        --eval-chunks 4 --arith-problems 40 --dial -1 0 1 --nproc 1      # a tiny run (the test's)

For each adaptation seed (the trainer's seed: null-row init, data order, sampling) and each operating
point (a target routed null share; w = zero_weight_for_share(target, E, Z), Z = E/2) it trains ZEDA
stage 1 and stage 2 and null experts without a teacher (plain NLL on the teacher's corpus, the stage-1
budget), each `torchrun -m zeda_megatron.train` with the demo's recipe (zeda_megatron/embedded/recipe.py);
then scores ZEDA 1+2 with its compute dial and, at ZEDA's measured expert FLOPs, ZEDA stage 1 only and
the no-teacher model (dial-matched), static top-k' (nearest whole k'), top-p and the XMoE threshold
(zeda_megatron/eval/quality.py). Once per seed it also runs the teacher-saturation control: the teacher
itself (no null experts) fine-tuned like the no-teacher model; a finished teacher moves < 0.5% in
held-out NLL and < 1 point in arithmetic.

Writes OUT/quality.json (mean and spread over seeds, the schema in zeda_megatron/eval/quality.py),
OUT/details.json (per-seed figures, dial curves, the control, the goals' verdicts, wall time),
OUT/quality.md (the table) and OUT/frontier_{nll,kl,arith_acc}.png. Every finished training run and
scored cell is reused on a re-run. Prints progress with an ETA, the table, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--cache", default=".cache/zeda", help="where a teacher that is not shipped is built")
    p.add_argument("--family", default="glm", choices=("glm", "qwen3"))
    p.add_argument("--preset", default="demo", choices=("demo", "test"), help="teacher")
    p.add_argument("--rebuild-teacher", action="store_true", help="build the teacher instead of the shipped one")
    p.add_argument("--points", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7], help="target routed null shares")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2, help="processes per training run (expert parallel size)")
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--opd-steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--eval-chunks", type=int, default=48)
    p.add_argument("--arith-problems", type=int, default=500)
    p.add_argument("--dial", nargs="*", type=float, default=[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    p.add_argument("--no-control", action="store_true", help="skip the teacher-saturation control")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- training runs -------------------------------------------------------------------------------------
def train(stage: str, run_dir: str, overrides: list[str], steps: int, nproc: int) -> str:
    """One trainer run (``torchrun`` of zeda_megatron.train, as the demo launches it) unless a finished
    one is there; returns its checkpoints folder."""
    summary = read_json(os.path.join(run_dir, "summary.json")) or {}
    if summary.get("steps_done", 0) >= steps:
        return os.path.join(run_dir, "checkpoints")
    from zeda_megatron.distributed import free_port

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
              str(free_port())] if nproc > 1 else [sys.executable]
    cmd = launch + ["-m", "zeda_megatron.train", f"stage={stage}", f"hydra.run.dir={run_dir}", *overrides,
                    f"trainer.max_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "job.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = open(os.path.join(run_dir, "job.log")).read().splitlines()[-30:]
        raise SystemExit(f"[quality] {stage} run failed ({run_dir}/job.log):\n" + "\n".join(tail))
    return os.path.join(run_dir, "checkpoints")


class Progress:
    """Units of work done so far and an ETA from their mean duration."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        el = time.time() - self.t0
        eta = el / self.done * (self.total - self.done)
        say(f"{self.done}/{self.total} done ({what}); elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min")


# ---- the run -----------------------------------------------------------------------------------------
def prepare(args, out: str):
    """The teacher, the distillation data and the no-teacher/control corpus (shared by all cells)."""
    from zeda_megatron.embedded import corpus, recipe, teacher

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or None
    tdir, info = teacher.ensure_teacher(os.path.join(ROOT, args.cache), args.family, args.preset, 0,
                                        threads=threads, rebuild=args.rebuild_teacher, log=say)
    say(f"teacher {tdir} ({'shipped' if info.get('shipped') else 'built here'}; hash {info['hash']})")
    ddir = os.path.join(out, "data")
    paths = {k: os.path.join(ddir, f"{k}.jsonl") for k in ("prompts", "sft", "text")}
    key = fingerprint([info["hash"], args.prompts, args.sft_steps])
    if (read_json(os.path.join(ddir, "done.json")) or {}).get("key") != key:
        corpus.write_prompts(paths["prompts"], n=args.prompts, seed=1)
        corpus.write_stage1_data(paths["sft"], teacher_dir=tdir, n=args.prompts, seed=0)
        corpus.write_stage1_data(paths["text"], n=recipe.corpus_rows(args.sft_steps), seed=0, mode="text")
        write_json(os.path.join(ddir, "done.json"), {"key": key})
    return tdir, info, paths


def run_cell(args, out, tdir, paths, target, seed, ev):
    """Train (or reuse) one cell's three models and score them (or reuse the scores)."""
    from zeda_megatron.embedded import recipe
    from zeda_megatron.eval.models import export_checkpoint, load
    from zeda_megatron.eval.quality import score_cell
    from zeda_megatron.routing import zero_weight_for_share

    cdir = os.path.join(out, f"null{round(100 * target)}", f"seed{seed}")
    key = fingerprint([ev["teacher_hash"], target, seed, args.sft_steps, args.opd_steps, args.prompts, args.dial,
                       args.eval_chunks, args.arith_problems, args.nproc])
    done = read_json(os.path.join(cdir, "cell.json"))
    if done and done.get("key") == key:
        return done["cell"]
    t0 = time.time()
    w = zero_weight_for_share(target, ev["E"], ev["E"] // 2)
    common = recipe.common(args.family, tdir, seed, w, args.nproc)
    s1 = train("sft", os.path.join(cdir, "sft"), common + recipe.stage1(paths["sft"]), args.sft_steps, args.nproc)
    s2 = train("opd", os.path.join(cdir, "opd"), common + recipe.stage2(paths["prompts"], s1), args.opd_steps, args.nproc)
    nt = train("sft", os.path.join(cdir, "no_teacher"), common + recipe.no_teacher(paths["text"]), args.sft_steps,
               args.nproc)
    models = [load(export_checkpoint(c, os.path.join(cdir, f"hf_{n}"))) for n, c in
              (("zeda", s2), ("stage1", s1), ("no_teacher", nt))]
    cell = score_cell(*models, ev["masked"], ev["data"], ev["ref"], args.dial, log=lambda m: None)
    cell.update(target_null_share=target, seed=seed, w=w, seconds=time.time() - t0)
    write_json(os.path.join(cdir, "cell.json"), {"key": key, "cell": cell})
    return cell


def run_control(args, out, tdir, paths, seed, ev) -> dict:
    """The teacher fine-tuned on its corpus for the stage-1 budget (no null experts): its change."""
    from zeda_megatron.embedded import recipe
    from zeda_megatron.eval.models import export_checkpoint, load
    from zeda_megatron.eval.scoring import score

    run_dir = os.path.join(out, "control", f"seed{seed}")
    ckpt = train("sft", run_dir, recipe.common(args.family, tdir, seed, 1.0, args.nproc) + recipe.control(paths["text"]),
                 args.sft_steps, args.nproc)
    r = score(*load(export_checkpoint(ckpt, os.path.join(run_dir, "hf"))), ev["data"], ev["ref"])
    return dict(seed=seed, nll=r["nll"], arith_acc=r["arith_acc"], kl=r["kl"], nll_change=r["nll_ratio"] - 1,
                arith_change_points=100 * (r["arith_acc"] - ev["ref"].arith_acc))


def control_summary(rows: list[dict]) -> dict:
    from zeda_megatron.eval.quality import spread

    s = {k: spread([r[k] for r in rows]) for k in ("nll", "arith_acc", "kl", "nll_change", "arith_change_points")}
    s["holds"] = abs(s["nll_change"]["mean"]) < 0.005 and abs(s["arith_change_points"]["mean"]) < 1.0
    return dict(s, per_seed=rows)


def main(argv=None) -> int:
    args = parse(argv)
    t_start = time.time()
    import torch

    from zeda_megatron.eval import quality as Q
    from zeda_megatron.eval.baselines import masked_teacher
    from zeda_megatron.eval.data import eval_data
    from zeda_megatron.eval.models import load, moe_sizes
    from zeda_megatron.eval.scoring import teacher_reference

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    out = os.path.abspath(os.path.join(ROOT, args.out))
    tdir, info, paths = prepare(args, out)
    t_model, t_tok = load(tdir)
    data = eval_data(t_tok, 0, args.eval_chunks, n_arith=args.arith_problems)
    ref = teacher_reference(t_model, t_tok, data)
    say(f"teacher: held-out NLL {ref.nll:.4f}, arithmetic {100 * ref.arith_acc:.1f}% ({len(data.problems)} problems)")
    ev = dict(data=data, ref=ref, masked=masked_teacher(tdir, out), E=moe_sizes(t_model.config)[0], teacher_hash=info["hash"])
    progress = Progress(len(args.seeds) * (len(args.points) + (0 if args.no_control else 1)))
    controls, cells = [], {t: [] for t in args.points}
    for seed in args.seeds:  # all points of a seed first: a cut-short run still spans the frontier
        if not args.no_control:
            controls.append(run_control(args, out, tdir, paths, seed, ev))
            progress.step(f"control, seed {seed}")
        for target in args.points:
            cells[target].append(run_cell(args, out, tdir, paths, target, seed, ev))
            z = cells[target][-1]["zeda"]
            progress.step(f"{100 * target:.0f}% null, seed {seed}: ZEDA {100 * z['expert_flops_removed']:.1f}% removed, "
                          f"NLL {z['nll']:.4f}, arith {100 * z['arith_acc']:.1f}%")
    quality = Q.aggregate({"nll": ref.nll, "arith_acc": ref.arith_acc}, cells)
    write_json(os.path.join(out, "quality.json"), quality)
    pngs = Q.plot_frontiers(quality, cells, out)
    verdict = Q.verdicts(quality, cells)
    control = control_summary(controls) if controls else None
    wall = time.time() - t_start
    write_json(os.path.join(out, "details.json"), dict(
        teacher={"dir": tdir, "hash": info["hash"], "shipped": bool(info.get("shipped"))}, control=control,
        verdicts=verdict, cells={str(t): c for t, c in cells.items()}, wall_seconds=wall, args=vars(args)))
    table = Q.table_md(quality)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    if control:
        say(f"teacher-saturation control: NLL {100 * control['nll_change']['mean']:+.2f}% "
            f"(± {100 * control['nll_change']['std']:.2f}), arithmetic {control['arith_change_points']['mean']:+.1f} "
            f"points (± {control['arith_change_points']['std']:.1f}): {'holds' if control['holds'] else 'does NOT hold'}")
    say(f"wall time {wall / 60:.1f} min; wrote {out}/quality.json, details.json, quality.md, "
        + ", ".join(os.path.basename(p) for p in pngs))
    print(json.dumps(dict(wall_seconds=round(wall, 1), teacher=quality["teacher"], control=control and {
        k: control[k] for k in ("nll_change", "arith_change_points", "holds")}, goal_60=verdict.get("goal_60"),
        ahead_everywhere=verdict["ahead_everywhere"],
        kl_closer_than_no_teacher_everywhere=verdict["kl_closer_than_no_teacher_everywhere"],
        zeda={str(p["target_null_share"]): {k: p["methods"]["zeda"][k]["mean"] for k in Q.METRICS}
              for p in quality["points"]})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
