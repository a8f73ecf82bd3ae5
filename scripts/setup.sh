#!/usr/bin/env bash
# Idempotent environment setup: creates .venv (or uses $ZEDA_VENV) with the pinned stack.
# Usage: bash scripts/setup.sh   (then: source .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ZEDA_VENV:-.venv}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "zeda-megatron needs Python >= 3.11, found " + sys.version.split()[0]'
LOCK=tools/gpu_node_lock.txt
stamp="$VENV/.zeda-setup-$(cat requirements.txt "$LOCK" scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then echo "[setup] $VENV is up to date"; exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# pip, quiet, minus known-harmless noise: this machine's local index mirrors, and setuptools' build-backend
# deprecation banners (SetuptoolsDeprecationWarning blocks framed by "!!" / "****" lines) and its
# "BuildBackendWarning: Editable installation" notice (+ the source line it quotes) while building the
# editable install; anything else is shown. Fails when pip fails (then the whole log is shown).
pipq() {
  local log rc=0
  log=$(mktemp)
  "$VPY" -m pip install -q "$@" >"$log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then cat "$log" >&2; else
    awk '/^ *!!$/ {skip = !skip; next} skip {next}
         /SetuptoolsDeprecationWarning|^ *[*][*][*][*][*][*][*][*]+$|^WARNING: Location/ {next}
         /BuildBackendWarning: Editable installation/ {getline; next} {print}' "$log" >&2
  fi
  rm -f "$log"
  return $rc
}
pipq --upgrade pip setuptools wheel
# torch first and alone, exact version, so nothing later can pull a CUDA build.
pipq "torch==2.13.0"
# Everything else at the tested versions: the lock (requirements.txt's closure, `python tools/wheelhouse.py lock`)
# constrains every transitive package, so a new upstream release cannot change what CI or a user installs.
pipq -c "$LOCK" -r requirements.txt
if "$VPY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
  pipq -c "$LOCK" "megatron-core==0.19.2"
else
  # The cp311 wheel exists and works; only its metadata claims >=3.12. Its deps are in requirements.txt.
  pipq --no-deps --ignore-requires-python "megatron-core==0.19.2"
fi
pipq --no-deps -e .
PYTHONWARNINGS=ignore "$VPY" -c 'import torch, megatron.core, transformers, hydra; print("[setup] torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| transformers", transformers.__version__)'
rm -f "$VENV"/.zeda-setup-*; touch "$stamp"
