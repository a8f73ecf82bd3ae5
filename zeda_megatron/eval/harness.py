"""lm-evaluation-harness on exported models, with the null share of the run next to its scores.

On a cluster, an exported adapted model is scored on the reference's benchmarks with the stock
harness (the PlusPlus modeling code ships in the directory)::

    lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True,dtype=bfloat16 \\
        --tasks gsm8k,minerva_math500,humaneval_plus,mbpp_plus,ifeval --batch_size 1 \\
        --apply_chat_template --output_path results/   # code tasks also need --confirm_run_unsafe_code

Here (no downloads) the project ships task files for its own held-out data in ``lm_eval_tasks/``
(``zeda_arith``: 500 held-out arithmetic problems, greedy exact match; ``zeda_code``: rolling
log-likelihood of held-out stdlib code)::

    python -m zeda_megatron.harness --model runs/demo/hf [--tasks zeda_arith,zeda_code] [--limit N]

runs ``lm_eval`` (the CLI, in a subprocess) with ``--include_path lm_eval_tasks`` and the environment
variable ``ZEDA_ROUTING_STATS``: the shipped modeling code counts the routed slots every MoE block sends
to null experts and writes them when the process exits, so the scores come back with the run's routed
null share (``--batch_size 1``: no padding positions are counted). Any task name works the same way
(e.g. ``--tasks gsm8k`` where the data can be downloaded). ``--write-data DIR`` regenerates the shipped
data files from the embedded corpus.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS_DIR = os.path.join(ROOT, "lm_eval_tasks")
DEFAULT_TASKS = ("zeda_arith", "zeda_code")
CLUSTER_TASKS = ("gsm8k", "minerva_math500", "humaneval_plus", "mbpp_plus", "ifeval")


def write_data(out_dir: str = os.path.join(TASKS_DIR, "data"), seed: int = 0, n_arith: int = 500,
               n_chunks: int = 48, chunk_chars: int = 600) -> list[str]:
    """The held-out sets of :mod:`zeda_megatron.eval.data` as the task files' JSONL data."""
    from zeda_megatron.embedded import corpus

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "arith_heldout.jsonl"), os.path.join(out_dir, "code_heldout.jsonl")]
    with open(paths[0], "w") as f:
        for p in corpus.arithmetic_problems(n_arith, seed):
            f.write(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n")
    with open(paths[1], "w") as f:
        for r in corpus.heldout_code_records(seed, n_chunks, chunk_chars):
            f.write(json.dumps({"text": r["text"], "file": r["file"]}) + "\n")
    return paths


def lm_eval_command(model_dir: str, tasks, out_dir: str, limit: int | None = None, batch_size: int = 1,
                    extra_model_args: str = "dtype=float32,add_bos_token=True", device: str = "cpu") -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    cmd = [exe if os.path.isfile(exe) else "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={os.path.abspath(model_dir)},trust_remote_code=True" + (f",{extra_model_args}" if extra_model_args else ""),
           "--tasks", ",".join(tasks) if not isinstance(tasks, str) else tasks, "--include_path", TASKS_DIR,
           "--batch_size", str(batch_size), "--device", device, "--output_path", out_dir]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def run_lm_eval(model_dir: str, tasks=DEFAULT_TASKS, out_dir: str | None = None, limit: int | None = None,
                timeout: int | None = None, **kw) -> dict:
    """Run the harness; returns ``{"scores": {task: {metric: value}}, "routed_null_share": ...,
    "null_share_per_layer": ..., "command": [...]}``."""
    out_dir = os.path.abspath(out_dir or tempfile.mkdtemp(prefix="lm_eval_"))
    os.makedirs(out_dir, exist_ok=True)
    stats_path = os.path.join(out_dir, "routing_stats.json")
    if os.path.exists(stats_path):
        os.remove(stats_path)
    cmd = lm_eval_command(model_dir, tasks, out_dir, limit=limit, **kw)
    env = {**os.environ, "ZEDA_ROUTING_STATS": stats_path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res_files = sorted(glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
    if not res_files:
        raise RuntimeError(f"lm_eval wrote no results under {out_dir}:\n{proc.stdout[-2000:]}")
    with open(res_files[-1]) as f:
        results = json.load(f)["results"]
    scores = {t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, (int, float)) and "stderr" not in k}
              for t, m in results.items()}
    stats = {}
    if os.path.isfile(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
    out = dict(model=os.path.abspath(model_dir), tasks=list(scores), scores=scores,
               routed_null_share=stats.get("null_share", 0.0 if not stats else None),
               null_share_per_layer=stats.get("per_layer", {}), routed_slots=stats.get("slots", 0),
               limit=limit, command=cmd, results_file=res_files[-1])
    with open(os.path.join(out_dir, "zeda_lm_eval.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported HF directory")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--write-data", metavar="DIR", default=None, help="regenerate the shipped task data")
    a = p.parse_args(argv)
    if a.write_data:
        for path in write_data(a.write_data):
            print(path)
        return 0
    if not a.model:
        p.error("--model is required")
    res = run_lm_eval(a.model, a.tasks.split(","), out_dir=a.out, limit=a.limit)
    for t, m in res["scores"].items():
        print(f"{t}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    share = res["routed_null_share"]
    print(f"routed null share of the run: {'n/a' if share is None else f'{share:.1%}'} ({res['routed_slots']} slots)")
    print(json.dumps({k: res[k] for k in ("scores", "routed_null_share")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
