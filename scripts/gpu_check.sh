#!/usr/bin/env bash
# One prepared GPU check (issues 9 and 15), under 8 minutes on one H100/H200:
#   1. a few AMP training steps of each optimizer (sgd / sam / gnm / gcsam) on ViT-B-16, random weights;
#   2. an fp16 ViT-B-16 bundle (random weights, 100 classes), parity-checked by the exporter;
#   3. the built Bento's own requirements installed in a fresh venv WITHOUT torch (as in the container),
#      the service served from it on CUDAExecutionProvider (required: no silent CPU fallback), provider and
#      CUDA / cuDNN versions printed, and the load test at concurrency 1 / 8 / 32 and 64.
# Without an NVIDIA GPU it stops at once with exit status 2 and says why (it never hangs: every step
# runs under `timeout`).
#
#   bash scripts/gpu_check.sh               # figures -> runs/gpu_check/ (markdown + json)
#   GPU_CHECK_SKIP_TRAIN=1 bash scripts/gpu_check.sh
#
# Needs: the package index (or a pip cache / wheelhouse via PIP_FIND_LINKS) for the dev venv and the
# Bento venv; an NVIDIA driver for the CUDA major of the pinned onnxruntime-gpu (README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
mkdir -p "$OUT"
log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/log.txt"; }
fail() { log "FAIL: $1"; exit "${2:-1}"; }

# 0. a GPU at all? (nvidia-smi answers in well under a second on a healthy host)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  fail "no nvidia-smi on PATH: this check needs an NVIDIA GPU and its driver (CI has none; nothing to do)" 2
fi
if ! timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1; then
  fail "nvidia-smi failed: $(head -c 300 "$OUT/gpu.txt")" 2
fi
log "GPU: $(cat "$OUT/gpu.txt")"

# 1. dev venv (torch 2.14.1 from PyPI is a CUDA build on x86_64)
timeout 900 bash scripts/bootstrap.sh >"$OUT/bootstrap.log" 2>&1 || fail "bootstrap failed (see $OUT/bootstrap.log)"
. .venv/bin/activate
python - <<'EOF' || fail "torch sees no CUDA device: check the driver against torch's CUDA build" 2
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
if [ -z "${GPU_CHECK_SKIP_TRAIN:-}" ]; then
  log "training steps: benchmarks/optim_cost.py --model ViT-B-16 --batch 64 --repeats 5 (bf16 autocast)"
  timeout 240 python benchmarks/optim_cost.py --model ViT-B-16 --batch 64 --repeats 5 \
    2>&1 | tee "$OUT/optim_cost.md" || fail "optimizer steps failed or ran past 240 s"
fi

# 2. fp16 bundle
python -c "print('\n'.join(f'class {i}' for i in range(100)))" >"$OUT/classes.txt"
log "export: ViT-B-16 zero-shot, random weights, --fp16"
timeout 300 python -m export --zero-shot --model ViT-B-16 --classes "$OUT/classes.txt" \
  --out "$OUT/bundle-b16" --force --fp16 >"$OUT/export.log" 2>&1 || fail "export failed (see $OUT/export.log)"

# 3. the Bento's own environment: bentoml build, then its requirements.txt in a fresh venv (no torch)
export BENTOML_HOME="$PWD/$OUT/bentoml" BENTOML_DO_NOT_TRACK=True
timeout 120 python -m serving.model_store "$OUT/bundle-b16" >"$OUT/bento.log" 2>&1 || fail "model store import failed"
timeout 180 bentoml build --output tag >>"$OUT/bento.log" 2>&1 || fail "bentoml build failed (see $OUT/bento.log)"
REQ=$(ls -d "$BENTOML_HOME"/bentos/flatprompt/*/env/python/requirements.txt | head -1)
[ -f "$REQ" ] || fail "the built Bento has no env/python/requirements.txt"
log "Bento requirements: $(grep -v '^#' "$REQ" | tr '\n' ' ')"
BENTOML_VERSION=$(python -c "import bentoml; print(bentoml.__version__)")
rm -rf "$OUT/bento-venv" && python3 -m venv "$OUT/bento-venv"
timeout 600 "$OUT/bento-venv/bin/pip" install -q -r "$REQ" "bentoml==$BENTOML_VERSION" >"$OUT/bento-pip.log" 2>&1 \
  || fail "installing the Bento's requirements failed (see $OUT/bento-pip.log)"
if "$OUT/bento-venv/bin/python" -c "import torch" 2>/dev/null; then
  fail "torch is importable in the Bento environment: the service must not depend on it"
fi
"$OUT/bento-venv/bin/python" - <<'EOF' 2>&1 | tee "$OUT/provider.txt" || fail "CUDAExecutionProvider does not start in the Bento environment" 2
from serving.runtime.bundle import cuda_versions, preload_gpu_libraries
import onnxruntime as ort
print("onnxruntime", ort.__version__, "available:", ort.get_available_providers())
print("preloaded:", preload_gpu_libraries())
print("cuda/cudnn:", cuda_versions())
EOF

log "load test on CUDAExecutionProvider (fp16 graphs chosen automatically)"
PYTHONPATH=$PWD timeout 420 \
  "$OUT/bento-venv/bin/python" benchmarks/serve_load.py --bundle "$OUT/bundle-b16" --prototype inworker \
  --providers CUDAExecutionProvider,CPUExecutionProvider --require-provider CUDAExecutionProvider --threads 8 --concurrency 1,8,32,64 \
  --images-per-request 1,8 --requests 512 --max-seconds 25 --names 1000 --workdir "$OUT/serve" \
  --json "$OUT/serve_load.json" 2>"$OUT/serve_load.err" | tee "$OUT/serve_load.md" \
  || fail "load test failed (see $OUT/serve_load.err)"
log "done: figures in $OUT/ (goal: >= 1,500 ViT-B-16 images/s over HTTP on one H100/H200)"
