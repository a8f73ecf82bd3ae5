"""GPU smoke of the trainer (marker ``gpu``; run by tools/gpu_smoke.sh), each against a reference computed
in the same run:

* bf16 stage-1 steps (4) then stage-2 steps (2) of tiny_glm and tiny_qwen3 on one GPU equal the fp32
  run of the same steps in a CPU subprocess (loss, nll/kl, group loss, grad norm, null share; bounds in
  tests/gpu/smoke_runs.py). Stage 2 trains on the GPU's samples in both runs (tests/gpu/train_wrapped.py
  replays them on the CPU): sampling from logits that differ by bf16 rounding would otherwise draw
  different tokens and nothing could be compared.
* save/resume: steps 3-4 resumed from the step-2 checkpoint equal the uninterrupted run's.
* export: the stage-1 checkpoint exported to Hugging Face reloads in transformers with the checkpoint's logits.
* >= 2 GPUs: EP=2 and TP=2 + sequence parallel equal the one-GPU run, step by step, both stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import smoke_runs as S

pytestmark = pytest.mark.gpu

MODELS = ("tiny_glm", "tiny_qwen3")
SFT = ["stage=sft", "trainer.max_steps=4", "trainer.save_interval=2", "trainer.keep_checkpoints=0"]
OPD = ["stage=opd", "trainer.max_steps=2", "stage.max_new_tokens=16"]


def n_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="session")
def stage_runs(tmp_path_factory):
    """Both models, both stages, GPU bf16 and CPU fp32; the CPU runs go in the background while the GPU
    runs. Returns {model: {"sft": (gpu rows, cpu rows), "opd": (...), "dirs": {...}}}."""
    root = tmp_path_factory.mktemp("stages")
    cpu = {m: S.start(root / m / "cpu_sft", f"model={m}", *SFT, cpu=True) for m in MODELS}
    out = {m: {"dirs": {k: root / m / k for k in ("gpu_sft", "cpu_sft", "gpu_opd", "cpu_opd")}} for m in MODELS}
    for m in MODELS:
        out[m]["gpu_sft"] = S.train(root / m / "gpu_sft", f"model={m}", *SFT)
    for m in MODELS:
        out[m]["gpu_opd"] = S.train(
            root / m / "gpu_opd", f"model={m}", *OPD, f"model.init_checkpoint={root / m / 'gpu_sft' / 'checkpoints'}",
            tokens=f"record:{root / m / 'tokens'}")
    cpu_opd = {}
    for m in MODELS:
        out[m]["cpu_sft"] = S.finish(cpu[m])
        cpu_opd[m] = S.start(root / m / "cpu_opd", f"model={m}", *OPD,
                             f"model.init_checkpoint={root / m / 'cpu_sft' / 'checkpoints'}", cpu=True,
                             tokens=f"replay:{root / m / 'tokens'}")
    for m in MODELS:
        out[m]["cpu_opd"] = S.finish(cpu_opd[m])
        out[m]["tokens"] = root / m / "tokens"
    return out


def _same_teacher(dirs) -> bool:
    """Both runs started from the same random-init teacher (written on the CPU from the seed)."""
    import hashlib

    def digest(d):
        h = hashlib.sha256()
        for f in sorted(os.listdir(d / "teacher_hf")):
            if f.endswith(".safetensors"):
                h.update((d / "teacher_hf" / f).read_bytes())
        return h.hexdigest()

    return digest(dirs["gpu_sft"]) == digest(dirs["cpu_sft"])


@pytest.mark.timeout(420)
@pytest.mark.parametrize("model", MODELS)
def test_bf16_steps_equal_the_cpu_fp32_run(model, stage_runs, figures):
    r = stage_runs[model]
    assert _same_teacher(r["dirs"]), "the GPU and CPU runs did not start from the same weights"
    results = {}
    for stage in ("sft", "opd"):
        res = S.compare(r[f"cpu_{stage}"], r[f"gpu_{stage}"])
        print(S.format_comparison(f"{model} {stage}: bf16 GPU vs fp32 CPU", res))
        results[stage] = res
        figures[stage] = {"rows": res["rows"], "max_diff_over_bound": res["max_diff_over_bound"]}
    assert [x["step"] for x in r["gpu_sft"]] == [1, 2, 3, 4] and [x["step"] for x in r["gpu_opd"]] == [1, 2]
    assert not results["sft"]["failures"] and not results["opd"]["failures"], \
        results["sft"]["failures"] + results["opd"]["failures"]


@pytest.mark.timeout(90)
def test_save_resume_matches_uninterrupted(stage_runs, tmp_path, figures):
    src = stage_runs["tiny_glm"]["dirs"]["gpu_sft"]
    resumed = S.train(tmp_path / "resumed", "model=tiny_glm", *SFT,
                      f"trainer.resume={src / 'checkpoints' / 'iter_0000002'}")
    assert [x["step"] for x in resumed] == [3, 4]
    res = S.compare(stage_runs["tiny_glm"]["gpu_sft"], resumed, S.RESUME_TOLERANCE, steps={3, 4})
    print(S.format_comparison("tiny_glm sft: resumed at step 2 vs uninterrupted (GPU bf16)", res))
    figures.update(rows=res["rows"])
    assert not res["failures"], res["failures"]


@pytest.mark.timeout(120)
def test_export_reloads_with_the_checkpoint_logits(stage_runs, tmp_path, figures):
    from transformers import AutoModelForCausalLM

    from zeda_megatron import plan as P
    from zeda_megatron.bridge.checkpoint import load_checkpoint
    from zeda_megatron.distributed import destroy_parallel, init_parallel

    ckpt = stage_runs["tiny_glm"]["dirs"]["gpu_sft"] / "checkpoints"
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(ckpt), "--out", str(out)],
                         cwd=S.ROOT, env=S.env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["zce_nums"][0] == 4  # Z = E/2 of tiny_glm
    ids = torch.randint(1, 500, (2, 48), generator=torch.Generator().manual_seed(3)).cuda()
    init_parallel(tp=1, pp=1, ep=1, seed=5)
    try:
        mc = load_checkpoint(str(ckpt)).eval()
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            ref = mc(ids, pos, None).float()
        dtype = next(mc.parameters()).dtype
        del mc
    finally:
        destroy_parallel()
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=dtype).cuda().eval()
    # the exported model holds exactly the student the plan counts (E + Z router rows)
    assert sum(p.numel() for p in hf.parameters()) == P.param_counts(cfg, cfg["zce_nums"][0])["student"]
    with torch.no_grad():
        got = hf(ids).logits.float()
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    figures.update(dtype=str(dtype), max_abs_diff=err, max_abs_logit=scale, argmax_agreement=agree)
    # the same weights in the same dtype through two implementations (TE/megatron vs transformers'
    # eager modules): rounding of intermediate results only, a few bf16 ulps of the largest logit
    assert err <= 0.03 * scale, (err, scale)
    assert agree >= 0.97, agree


LAYOUTS = {"ep2": ["parallel=ep2"], "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_gpus_equal_one_gpu(layout, stage_runs, tmp_path, figures):
    if n_gpus() < 2:
        pytest.skip(f"needs 2 GPUs, {n_gpus()} visible")
    one = stage_runs["tiny_glm"]
    sft = S.train(tmp_path / "sft", "model=tiny_glm", *SFT, *LAYOUTS[layout], nproc=2)
    opd = S.train(tmp_path / "opd", "model=tiny_glm", *OPD, *LAYOUTS[layout],
                  f"model.init_checkpoint={tmp_path / 'sft' / 'checkpoints'}", nproc=2,
                  tokens=f"replay:{one['tokens']}")
    fails = []
    for stage, ref, got in (("sft", one["gpu_sft"], sft), ("opd", one["gpu_opd"], opd)):
        res = S.compare(ref, got, S.LAYOUT_TOLERANCE)
        print(S.format_comparison(f"tiny_glm {stage}: {layout} on 2 GPUs vs 1 GPU", res))
        figures[stage] = {"rows": res["rows"], "max_diff_over_bound": res["max_diff_over_bound"]}
        fails += res["failures"]
    assert not fails, fails
