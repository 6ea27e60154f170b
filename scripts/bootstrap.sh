#!/usr/bin/env bash
# Create .venv and install flatprompt with every extra. Idempotent; safe to re-run.
# torch goes first and pinned: an unpinned torch pulls several GB of CUDA wheels from PyPI.
# torch 2.14.1 + torchvision 0.29.1 (not 2.13.0): PyPI's torchvision 0.28.0 is a CUDA build whose
# C ops do not load beside the 2.13.0 CPU wheel ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -c "import torch, torchvision" 2>/dev/null || \
  pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import torch, torchvision, open_clip, onnxruntime, bentoml" >/dev/null
