#!/usr/bin/env bash
# GPU smoke suite for a node with 1-8 NVIDIA GPUs, its own CUDA build of torch (2.11-2.13) and no network.
#
#   tools/gpu_smoke.sh --wheelhouse DIR [--target DIR] [--out DIR] [-- PYTEST_ARGS...]
#   tools/gpu_smoke.sh                      # the environment is ready already (.venv, or PYTHON=...)
#
# --wheelhouse DIR: install the project's other requirements from DIR (made on a login node with the
#   command `python tools/wheelhouse.py download-command` prints; docs/gpu.md) into --target (default
#   $HOME/.cache/zeda-gpu-site), which goes on PYTHONPATH; torch and its CUDA stack are never replaced.
#   A wheelhouse that lacks a requirement stops here (exit 4), naming it and the command that fetches it.
# Then the `gpu` tests in tests/gpu: bf16 stage-1/stage-2 steps of tiny_glm and tiny_qwen3 against the
# CPU fp32 run (a CPU subprocess of the same run), grouped vs sequential experts, save/resume, export +
# transformers reload, a mid-size step of each released model against the memory plan and the rehearsal,
# tools/bench_moe_layer.py and tools/bench_rollout.py; with >= 2 GPUs EP=2 and TP=2+SP against one GPU.
# Transformer Engine is optional: without it the local spec runs and the report says so.
#
# Writes $OUT/report.json (default runs/gpu_smoke): per check its outcome, wall time, budget and figures,
# plus the environment (torch, CUDA, GPUs, spec). Exit status: pytest's (0 = all passed); 3 without a
# usable CUDA device (or with ZEDA_FORCE_CPU=1): nothing is run, so a CPU machine never reports a GPU pass.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WHEELHOUSE="" TARGET="${ZEDA_GPU_SITE:-$HOME/.cache/zeda-gpu-site}" OUT="${ZEDA_SMOKE_OUT:-runs/gpu_smoke}" LOCK=""
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --target) TARGET="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --lock) LOCK="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; PYTEST_ARGS+=("$@"); break ;;
    *) PYTEST_ARGS+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -z "$WHEELHOUSE" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "$WHEELHOUSE" ]; then
  args=(install --wheelhouse "$WHEELHOUSE" --target "$TARGET")
  [ -n "$LOCK" ] && args+=(--lock "$LOCK")
  "$PY" tools/wheelhouse.py "${args[@]}" || exit $?
  TARGET=$(cd "$TARGET" && pwd)
  export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
NGPU=$("$PY" -c 'import os, torch; print(0 if os.environ.get("ZEDA_FORCE_CPU") == "1" or not torch.cuda.is_available() else torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$NGPU" = "0" ]; then
  echo "gpu_smoke: no CUDA GPU available (torch.cuda.is_available() is False or ZEDA_FORCE_CPU=1):" \
       "nothing was run. This suite needs 1-8 NVIDIA GPUs; the CPU tests are in tests/ (pytest)." >&2
  exit 3
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export ZEDA_SMOKE_OUT="$OUT" PYTHONWARNINGS=ignore WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "gpu_smoke: $NGPU GPU(s), $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'); report in $OUT/report.json"
"$PY" -m pytest -m gpu tests/gpu -v -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" "${PYTEST_ARGS[@]}" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
echo "gpu_smoke: pytest exit status $status; report: $OUT/report.json"
exit "$status"
