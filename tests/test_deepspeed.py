"""engine=deepspeed (CPU/gloo, 2 ranks): the megatron-core student under DeepSpeed ZeRO 1/2/3 trains
exactly like engine=megatron.

One 2-rank job (module fixture) runs, on the same batches and seed (fp32, lr > 0, cosine schedule
with warmup, weight decay, an active grad clip): engine=megatron at EP=2 and EP=1, engine=deepspeed
ZeRO-1 and ZeRO-2 at EP=2, ZeRO-2 and ZeRO-3 at EP=1 and ZeRO-2 with the optimizer offloaded.
Each runs 5 steps through the trainer's train_step; the ZeRO-2/EP=2 run is also checkpointed after
3 steps and resumed in a fresh engine (DeepSpeed's load_checkpoint), and both engines' final
checkpoints are exported to HF directories through the export path (tools/export_hf.py's
load_checkpoint + save_hf_pretrained)."""

import os

import pytest
import torch

from dist_helpers import run_distributed

REL = 1e-5
STEPS = 5
OPTIM = {"lr": 1e-3, "min_lr": 0.0, "schedule": "cosine", "warmup_fraction": 0.2, "clip_grad": 0.05,
         "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_eps": 1e-8}
CLIP_GRAD = OPTIM["clip_grad"]
RUNS = {  # name: (engine, ep, engine config)
    "megatron_ep2": ("megatron", 2, None),
    "zero1_ep2": ("deepspeed", 2, {"zero_stage": 1}),
    "zero2_ep2": ("deepspeed", 2, {"zero_stage": 2}),
    "megatron_ep1": ("megatron", 1, None),
    "zero2_ep1": ("deepspeed", 1, {"zero_stage": 2}),
    "zero3_ep1": ("deepspeed", 1, {"zero_stage": 3}),
    "zero2_offload_ep1": ("deepspeed", 1, {"zero_stage": 2, "offload_optimizer": True}),
    # GLM (MLA, shared expert, router expert bias updated after every step)
    "glm_megatron_ep2": ("megatron", 2, None),
    "glm_zero2_ep2": ("deepspeed", 2, {"zero_stage": 2}),
}
RESUME_AT = 3
RESUMED = ("zero2_ep2", "zero3_ep1")  # checkpointed at step 3 and resumed in a fresh engine


def _batches(step: int, rank: int):
    """This rank's two micro-batches of a 4-row global batch (rows of different lengths, right padded)."""
    from trainer_fixtures import batch_of

    gen = torch.Generator().manual_seed(100 + step)
    seqs = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (16, 11, 9, 14)]
    b = batch_of(seqs, length=15, prompt_lens=[1, 3, 2, 1])
    mine = {k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()}
    return [{k: v[:1] for k, v in mine.items()}, {k: v[1:] for k, v in mine.items()}]


def _build(hf_dir, engine, cfg):
    from spec_fixtures import run_spec

    from zeda_megatron.training.engine import build_engine

    overrides = ["stage=sft", "stage.nll_weight=1.0", "stage.kl_weight=0.5", "model.null_experts.ratio=null",
                 "model.null_experts.num=4", "model.null_experts.weight=2.0", "model.group_loss_coeff=0.1",
                 "trainer.max_steps=10", "seed=0", "trainer.precision=fp32", *(f"optim.{k}={v}" for k, v in OPTIM.items())]
    if engine == "deepspeed":
        overrides += ["engine=deepspeed", *(f"engine.{k}={v}" for k, v in cfg.items())]
    return build_engine(run_spec(hf_dir, *overrides))


def _metrics(engine, step, rank):
    from trainer_fixtures import step_metrics

    o = step_metrics(engine, _batches(step, rank))
    return {k: o[k] for k in ("loss", "nll", "kl", "grad_norm", "lr", "group_loss", "null_share", "tokens")}


def _optimizer_bytes(engine, masters=True) -> dict:
    from zeda_megatron.training.ds_engine import optimizer_state_bytes

    return optimizer_state_bytes(engine.ds.optimizer if getattr(engine, "ds", None) else engine.optimizer, masters)


def _export(save_dir, out_dir):
    from zeda_megatron.bridge.checkpoint import assets_dir, load_checkpoint
    from zeda_megatron.bridge.export_hf import save_hf_pretrained

    model = load_checkpoint(save_dir)
    save_hf_pretrained(model, out_dir, assets_dir=assets_dir(save_dir), null=model.zeda_null)


def _job(rank, world, hf_dirs, tmp):
    from zeda_megatron.distributed import init_parallel
    from zeda_megatron.training import checkpoint

    out = {}
    for name, (engine_name, ep, cfg) in RUNS.items():
        init_parallel(ep=ep, seed=0)
        hf_dir = hf_dirs["glm" if name.startswith("glm") else "qwen3"]
        engine = _build(hf_dir, engine_name, cfg)
        rows = []
        for step in range(STEPS):
            rows.append(_metrics(engine, step, rank))
            if name in RESUMED and step + 1 == RESUME_AT:
                checkpoint.save(engine, RESUME_AT, os.path.join(tmp, "resume_" + name), extra={"hf_dir": hf_dir, "seed": 0})
        res = {"rows": rows, "opt_bytes": _optimizer_bytes(engine), "moment_bytes": _optimizer_bytes(engine, False),
               "n_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.student.parameters())}
        if getattr(engine, "ds", None) is not None:
            opt = engine.ds.optimizer
            res["ds_cpu_offload"] = bool(getattr(opt, "cpu_offload", False))
            res["ds_offload_devices"] = sorted({t.device.type for t in getattr(opt, "single_partition_of_fp32_groups", [])})
        if name in ("megatron_ep2", "zero2_ep2", "megatron_ep1", "zero3_ep1"):
            save_dir = os.path.join(tmp, name)
            checkpoint.save(engine, STEPS, save_dir, extra={"hf_dir": hf_dir, "seed": 0})
            _export(save_dir, os.path.join(tmp, name + "_hf"))
        if name == "megatron_ep1":  # the EP=2 DeepSpeed checkpoint exported at EP=1 (experts re-mapped)
            _export(os.path.join(tmp, "zero2_ep2"), os.path.join(tmp, "zero2_ep2_at_ep1_hf"))
        if name in RESUMED:  # a fresh engine resumed from step 3 (DeepSpeed's load_checkpoint)
            fresh = _build(hf_dir, engine_name, cfg)
            meta = checkpoint.load(fresh, checkpoint.latest(os.path.join(tmp, "resume_" + name)))
            assert meta["step"] == RESUME_AT and meta["engine"] == "deepspeed"
            res["resumed"] = [_metrics(fresh, step, rank) for step in range(RESUME_AT, STEPS)]
        out[name] = res  # the next layout's groups are rebuilt in the same process group
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from bridge_fixtures import GLM, QWEN3, make_tiny_hf

    tmp = tmp_path_factory.mktemp("ds")
    hf_dirs = {"qwen3": make_tiny_hf(QWEN3, str(tmp / "hf")), "glm": make_tiny_hf(GLM, str(tmp / "hf_glm"))}
    results = run_distributed(_job, 2, hf_dirs, str(tmp))
    return {"ranks": results, "tmp": tmp}


def _close(a, b, keys=("loss", "nll", "kl", "grad_norm", "lr", "group_loss", "null_share")):
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=REL, abs=1e-7), (k, ra, rb)


@pytest.mark.parametrize("run, reference", [("zero1_ep2", "megatron_ep2"), ("zero2_ep2", "megatron_ep2"),
                                            ("zero2_ep1", "megatron_ep1"), ("zero3_ep1", "megatron_ep1"),
                                            ("zero2_offload_ep1", "megatron_ep1"), ("glm_zero2_ep2", "glm_megatron_ep2")])
def test_first_losses_equal_megatron(job, run, reference):
    r0 = job["ranks"][0]
    ref = r0[reference]["rows"]
    assert len({round(r["loss"], 6) for r in ref}) == STEPS  # the weights move
    assert any(r["grad_norm"] > OPTIM["clip_grad"] for r in ref)  # the clip acts
    _close(r0[run]["rows"], ref)


@pytest.mark.parametrize("run", RESUMED)
def test_resume_equals_uninterrupted(job, run):
    for r in job["ranks"]:
        _close(r[run]["resumed"], r[run]["rows"][RESUME_AT:])
        for a, b in zip(r[run]["resumed"], r[run]["rows"][RESUME_AT:]):
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]  # bit-exact


def test_zero2_optimizer_state_is_about_half_per_rank(job):
    for r in job["ranks"]:
        megatron = sum(r["megatron_ep1"]["opt_bytes"].values())
        zero2 = sum(r["zero2_ep1"]["opt_bytes"].values())
        # Adam's moments (megatron's fp32 optimizer keeps no master copy) vs ZeRO-2's half of
        # moments + fp32 master partition: 12/2 vs 8 bytes per parameter at DP=2
        assert 0.4 * megatron < zero2 < 0.8 * megatron, (zero2, megatron)
        n = r["zero2_ep1"]["n_params"]
        assert megatron == pytest.approx(8 * n, rel=1e-3)  # fp32 Adam: 2 moments per parameter (+ step counters)
        assert zero2 == pytest.approx(12 * n / 2, rel=0.01)  # the plan's ZeRO figure: 12 B x this rank's half
        assert sum(r["zero2_offload_ep1"]["opt_bytes"].values()) == pytest.approx(zero2, rel=0.01)
        # Adam's moments alone: half of megatron's on each of the 2 ranks
        moments = sum(r["zero2_ep1"]["moment_bytes"].values())
        assert moments == pytest.approx(sum(r["megatron_ep1"]["moment_bytes"].values()) / 2, rel=1e-3)
        assert r["zero2_offload_ep1"]["ds_cpu_offload"] and r["zero2_offload_ep1"]["ds_offload_devices"] == ["cpu"]
        assert not r["zero2_ep1"]["ds_cpu_offload"]


@pytest.mark.parametrize("run, reference", [("zero2_ep2", "megatron_ep2"), ("zero3_ep1", "megatron_ep1"),
                                            ("zero2_ep2_at_ep1", "megatron_ep2")])
def test_deepspeed_checkpoint_exports_like_megatron(job, run, reference):
    from bridge_fixtures import hf_logits

    tmp = job["tmp"]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    a = hf_logits(str(tmp / f"{reference}_hf"), ids, trust_remote_code=True)
    b = hf_logits(str(tmp / f"{run}_hf"), ids, trust_remote_code=True)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, key", [
    (["engine=deepspeed", "parallel=pp2"], "parallel.pp"),
    (["engine=deepspeed", "parallel=ep2", "engine.zero_stage=3"], "engine.zero_stage=3"),
    (["engine=deepspeed", "engine.zero_stage=4"], "engine.zero_stage"),
    (["engine=deepspeed", "engine.offload_param=true"], "engine.offload_param"),
    (["engine=deepspeed", "parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.tp"),
    (["engine=deepspeed", "optim.optimizer_cpu_offload=true"], "engine.offload_optimizer"),
    (["engine=fsdp"], "engine"),
])
def test_unsupported_layouts_refused(overrides, key):
    from zeda_megatron.spec import compose
    from zeda_megatron.training.validate import ConfigError, validate_config

    try:
        cfg = compose(["model=tiny_qwen3", "run_dir=/tmp/x", *overrides])
    except Exception as e:  # an unknown config group option is Hydra's refusal
        assert key in str(e)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg, 2, check_data=False)


def test_supported_deepspeed_configs_validate():
    from zeda_megatron.spec import compose
    from zeda_megatron.training.validate import validate_config

    for extra in (["parallel=ep2", "engine.zero_stage=2"], ["engine.zero_stage=3", "engine.offload_param=true",
                                                           "engine.offload_optimizer=true"]):
        cfg = compose(["model=tiny_qwen3", "run_dir=/tmp/x", "engine=deepspeed", *extra])
        validate_config(cfg, 2, check_data=False)


def test_memory_plan_knows_both_engines():
    from zeda_megatron.plan import memory_plan
    from zeda_megatron.spec import compose, resolve

    def plan(*o):
        cfg = compose(["model=qwen3_30b_a3b", "parallel.tp=1", "parallel.ep=1", "parallel.pp=1",
                       "parallel.sequence_parallel=false", "trainer.global_batch_size=16", *o])  # DP 8
        return memory_plan(resolve(cfg, 8, inputs=False, on_gpu=True, gpu_gb=80))

    mg = plan("engine=megatron", "optim.use_distributed_optimizer=false", "optim.optimizer_cpu_offload=false")
    z1, z2 = plan("engine=deepspeed", "engine.zero_stage=1"), plan("engine=deepspeed", "engine.zero_stage=2")
    z3 = plan("engine=deepspeed", "engine.zero_stage=3")
    z3o = plan("engine=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_param=true")
    n = mg["per_gpu_params"]["student"]
    b = lambda p, k: p["per_gpu_bytes"][k]  # noqa: E731
    assert b(mg, "optimizer_states") == 12 * n  # bf16 params: fp32 master + 2 moments, unsharded
    assert b(z1, "optimizer_states") == pytest.approx(12 * n / 8, rel=1e-6)  # ZeRO: over DP = 8
    assert b(z2, "student_grads") < b(z1, "student_grads") and b(z3, "student_params") < b(z2, "student_params")
    assert b(z3o, "optimizer_states") == 0 and z3o["host_optimizer_bytes"] > 0 and z3o["host_param_bytes"] > 0
    assert z3o["gpu_bytes"] < z3["gpu_bytes"] < z2["gpu_bytes"] < z1["gpu_bytes"] < mg["gpu_bytes"]


# ---- the job from the command line: engine=deepspeed through zeda_megatron.train (one loop) ----------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = ["model=tiny_qwen3", "stage=sft", "parallel=ep2",
       "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.seq_length=32", "trainer.max_steps=8",
       "optim.lr=1e-3", "trainer.verify_teacher=true"]


def _cli(run_dir, *overrides, engine=("engine=deepspeed", "engine.zero_stage=2")):
    import sys

    from zeda_megatron.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "zeda_megatron.train", f"hydra.run.dir={run_dir}", *CLI, *engine, *overrides]


def _env():
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _rows(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cli_full(tmp_path_factory):
    """An uninterrupted engine=deepspeed stage-1 run (ZeRO-2, EP=2) through zeda_megatron.train."""
    import subprocess

    full = tmp_path_factory.mktemp("cli") / "full"
    res = subprocess.run(_cli(full), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return full


def test_kill_and_resume_from_the_command_line(tmp_path, cli_full):
    """SIGTERM to the ranks (as Slurm sends) mid-run: DeepSpeed checkpoint, clean exit; the same
    command resumes through DeepSpeed's load_checkpoint and the metrics equal the uninterrupted run."""
    import json
    import signal
    import subprocess
    import time

    import psutil

    full, killed = cli_full, tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    path = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 400
    while time.time() < deadline and not (os.path.isfile(path) and len(open(path).read().splitlines()) >= 2):
        time.sleep(0.05)
    for child in psutil.Process(proc.pid).children():
        child.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=400)
    with open(os.path.join(killed, "summary.json")) as f:
        interrupted = json.load(f)["steps_done"]
    assert 2 <= interrupted < 8, out[-3000:]
    ckpt = os.path.join(killed, "checkpoints", f"iter_{interrupted:07d}")
    assert os.path.isdir(os.path.join(ckpt, "ds")) and os.path.isfile(os.path.join(ckpt, "student_ep001.pt"))
    res = subprocess.run(_cli(killed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = _rows(full), _rows(killed)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "lr", "null_share", "group_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (key, ra, rb)
    with open(os.path.join(killed, "summary.json")) as f:
        assert json.load(f)["teacher_unchanged"] is True


def test_stage2_with_router_replay_equals_megatron(tmp_path, cli_full):
    """Stage 2 (on-policy sampling, reverse KL, router replay) from the DeepSpeed stage-1 checkpoint
    (model.init_checkpoint): engine=deepspeed ZeRO-1 and engine=megatron give the same samples'
    losses, KL, grad norms, group losses and null shares."""
    import subprocess

    opd = ["stage=opd", "trainer.max_steps=2", "stage.max_new_tokens=8", "stage.router_replay=true",
           f"model.init_checkpoint={cli_full}/checkpoints"]
    runs = {}
    for name, engine in (("ds", ("engine=deepspeed", "engine.zero_stage=1")), ("mg", ("engine=megatron",))):
        res = subprocess.run(_cli(tmp_path / name, *opd, engine=engine), cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        runs[name] = _rows(tmp_path / name)
    assert len(runs["ds"]) == 2 and all(r["kl"] > 0 for r in runs["ds"])
    for a, b in zip(runs["ds"], runs["mg"], strict=True):
        for key in ("loss", "nll", "kl", "grad_norm", "group_loss", "null_share", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
