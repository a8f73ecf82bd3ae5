"""The main job (layer demo) and the layer benchmark run end to end (tiny settings)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def test_null_layer_demo_runs_and_writes_summary(tmp_path):
    out = tmp_path / "demo.json"
    res = subprocess.run(
        [sys.executable, "tools/demo_null_layer.py", "--ep", "1", "--steps", "3", "--out", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["target_null_share"] == 0.5 and len(summary["history"]) == 3
    final = summary["final"]
    assert final["rows_sent"] < final["stock_rows"]
    assert "null share" in res.stdout


def test_bench_prints_ratio_table():
    res = subprocess.run(
        [sys.executable, "tools/bench_moe_layer.py", "--iters", "1", "--warmup", "0", "--tokens", "64",
         "--hidden", "32", "--ffn", "32", "--experts", "4", "--null-experts", "4", "--topk", "2"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 4
    # rows sent track the null share exactly: 1 - share of the 64*2 stock rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[5]) == round(1 - float(cells[1]), 2)
    figures = json.loads(res.stdout.strip().splitlines()[-1])  # ends with one JSON line of its figures
    assert [p["rows_ratio"] for p in figures["points"]] == [pytest.approx(1 - p["null_share"]) for p in figures["points"]]


def test_generate_responses_writes_continues_and_validates(tmp_path):
    from bridge_fixtures import make_tiny_hf

    teacher = make_tiny_hf("qwen3_moe", str(tmp_path / "teacher"), seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(3)))
    out = tmp_path / "sft.jsonl"
    cmd = [sys.executable, "tools/generate_responses.py", "--teacher", teacher, "--prompts", str(prompts),
           "--out", str(out), "--max-new-tokens", "4"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["w0 w1", "w1 w2", "w2 w3"] and all("response" in r for r in rows)
    before = out.read_text()
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "0 to go" in res.stdout and out.read_text() == before
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "line 2" in res.stderr and "'prompt'" in res.stderr
    assert "Traceback" not in res.stderr
    assert out.read_text() == before  # nothing already written is lost
