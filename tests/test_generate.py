"""``python -m zeda_megatron.generate``: the KV-cached megatron sampler writes the responses greedy HF
``generate`` gives with the exported teacher (same prompt template), from the HF teacher and from a
megatron checkpoint under EP=2 x DP=2 (torchrun; prompts sharded, merged in order); a SIGKILLed run
resumes without a lost or duplicated line (also after a torn last line); tools/generate_responses.py
is a thin entry to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
NEW = 6
N_PROMPTS = 12


def _convert_and_export(rank, world, hf_dir, ckpt_dir, export_dir):
    """The teacher through the bridge: a megatron checkpoint, and its export back to HF."""
    from zeda_megatron.bridge.builders import build_model
    from zeda_megatron.bridge.checkpoint import save_checkpoint
    from zeda_megatron.bridge.export_hf import save_hf_pretrained
    from zeda_megatron.bridge.import_hf import load_hf_weights
    from zeda_megatron.distributed import init_parallel

    init_parallel()
    model, _, _ = build_model(hf_dir, None)
    load_hf_weights(model, hf_dir)
    save_checkpoint(model, ckpt_dir, hf_dir=hf_dir, seed=0)
    save_hf_pretrained(model, export_dir, assets_dir=hf_dir)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from bridge_fixtures import make_tiny_hf
    from dist_helpers import run_distributed

    d = tmp_path_factory.mktemp("generate")
    hf = make_tiny_hf("qwen3_moe", str(d / "hf"), seed=3)
    run_distributed(_convert_and_export, 1, hf, str(d / "ckpt"), str(d / "exported"))
    prompts = d / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(N_PROMPTS):
            f.write(json.dumps({"prompt": " ".join(f"w{(i * 5 + j) % 100}" for j in range(2 + i % 4)), "id": i}) + "\n")
    return {"dir": d, "hf": hf, "ckpt": str(d / "ckpt"), "exported": str(d / "exported"), "prompts": str(prompts)}


def _cmd(t, out, *extra, launcher=None):
    base = launcher or [sys.executable]
    return [*base, "-m", "zeda_megatron.generate", f"model.hf_dir={t['hf']}", "model.hf_config=null",
            f"data.prompts={t['prompts']}", f"output={out}", f"max_new_tokens={NEW}", "batch_size=1", "flush_every=4",
            f"hydra.run.dir={t['dir'] / 'runs'}", *extra]


def _hf_reference(t) -> list[dict]:
    """Greedy HF generate of the exported teacher, one prompt at a time, same template (templates.py)."""
    from transformers import AutoModelForCausalLM

    from zeda_megatron.training.templates import encode_prompts
    from zeda_megatron.training.tokenizers import load_tokenizer

    tok = load_tokenizer({"hf_dir": t["exported"]})
    model = AutoModelForCausalLM.from_pretrained(t["exported"], dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(t["prompts"])]
    out = []
    for r in rows:
        ids = encode_prompts(tok, [r["prompt"]], False)[0]
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id)
        new = [x for x in g[0, len(ids):].tolist() if x != tok.eos_id]
        out.append({"prompt": r["prompt"], "response": tok.decode(new)})
    return out


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_generate_equals_hf_greedy_and_resumes_after_kill(teacher):
    t = teacher
    ref = _hf_reference(t)
    assert any(r["response"] for r in ref)
    out = t["dir"] / "killed.jsonl"
    log = open(t["dir"] / "killed.log", "w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(_cmd(t, out), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)  # mid-run: more batches are still to come
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    log.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    kept = out.read_text()
    assert 1 <= kept.count("\n") < N_PROMPTS
    with open(out, "a") as f:
        f.write('{"prompt": "w')  # and a torn line, as if killed inside the write
    res = subprocess.run(_cmd(t, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"{kept.count(chr(10))} already in" in res.stdout
    assert _lines(out) == ref  # nothing lost, nothing duplicated, same answers as HF greedy
    res = subprocess.run(_cmd(t, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "0 to go" in res.stdout and _lines(out) == ref


def test_generate_from_checkpoint_under_ep2_dp2(teacher):
    """torchrun, 2 ranks, parallel=ep2 (EP 2 x DP 2): prompts sharded per rank and merged in order;
    the megatron checkpoint answers as the HF teacher does."""
    t = teacher
    out = t["dir"] / "ep2.jsonl"
    from zeda_megatron.distributed import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]
    cmd = _cmd(t, out, f"checkpoint={t['ckpt']}", "parallel=ep2", "batch_size=3", launcher=torchrun)
    cmd = [c for c in cmd if not c.startswith("model.hf_dir")] + ["model.hf_dir=null"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert _lines(out) == _hf_reference(t)


def test_generate_responses_tool_is_a_thin_entry(teacher, tmp_path):
    t = teacher
    out = tmp_path / "sft.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "generate_responses.py"), "--teacher", t["hf"],
           "--prompts", t["prompts"], "--out", str(out), "--max-new-tokens", str(NEW), "--batch-size", "5",
           "--limit", "5"]
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert _lines(out) == _hf_reference(t)[:5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    cmd[cmd.index("--prompts") + 1] = str(bad)
    cmd[cmd.index("--out") + 1] = str(tmp_path / "other.jsonl")
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "line 2" in res.stderr and "prompt" in res.stderr
    assert "Traceback" not in res.stderr
