#!/usr/bin/env bash
# The main job on the embedded toy world: set up, train prompts, evaluate (zero-shot vs tuned).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
RUN=${RUN:-runs/toy}
python -m trainer fit --out "$RUN" "$@"
