#!/usr/bin/env bash
# GPU smoke suite: run on a node with 1-8 NVIDIA GPUs (two or more add the NCCL EP=2 / TP=2+SP runs).
#
#   tools/gpu_smoke.sh                 # all `gpu` tests in tests/gpu + the MoE layer benchmark
#   tools/gpu_smoke.sh -k grouped      # extra arguments go to pytest
#
# Checks: Transformer Engine spec build (both families, null experts), grouped GEMM + fused permute vs
# sequential experts, bf16 stage-1 and stage-2 steps on tiny_glm and tiny_qwen3, EP=2 and TP=2 + sequence
# parallel over NCCL (>= 2 GPUs), the distributed optimizer and CPU optimizer offload, save/resume, export
# + Hugging Face reload, tools/bench_moe_layer.py. Reports go to $ZEDA_SMOKE_OUT (default runs/gpu_smoke):
# pytest's junit XML, the log, nvidia-smi, the benchmark table.
#
# Exit status: pytest's (0 = all passed). Without a usable CUDA device (or with ZEDA_FORCE_CPU=1) it runs
# nothing, says so on stderr and exits 3, so that a CPU-only "success" can never be mistaken for a GPU run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
NGPU=$("$PY" -c 'import os, torch; print(0 if os.environ.get("ZEDA_FORCE_CPU") == "1" or not torch.cuda.is_available() else torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$NGPU" = "0" ]; then
  echo "gpu_smoke: no CUDA GPU available (torch.cuda.is_available() is False or ZEDA_FORCE_CPU=1):" \
       "nothing was run. This suite needs 1-8 NVIDIA GPUs; the CPU tests are in tests/ (pytest)." >&2
  exit 3
fi
OUT="${ZEDA_SMOKE_OUT:-runs/gpu_smoke}"
mkdir -p "$OUT"
export ZEDA_SMOKE_OUT="$OUT" PYTHONWARNINGS=ignore WANDB_MODE=disabled
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "gpu_smoke: $NGPU GPU(s); reports in $OUT"
"$PY" -m pytest -m gpu tests/gpu -v -rs --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
if [ -f "$OUT/bench_moe_layer.txt" ]; then cat "$OUT/bench_moe_layer.txt"; fi
echo "gpu_smoke: pytest exit status $status"
exit "$status"
