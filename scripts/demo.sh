#!/usr/bin/env bash
# The main job on the embedded toy world, start to finish on CPU:
#   set up -> train prompts (zero-shot vs tuned table) -> export a verified ONNX bundle
#   -> serve it with BentoML on 127.0.0.1:3000 (Ctrl-C stops the server).
# SERVE=0 skips the server; extra arguments go to `python -m trainer fit`, with a run folder of their own:
#   RUN=runs/gnm BUNDLE=bundles/gnm bash scripts/demo.sh --set optim.name=gnm
# (a rerun into a folder trained with other settings is refused, not silently resumed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
RUN=${RUN:-runs/toy}
BUNDLE=${BUNDLE:-bundles/toy}
PORT=${PORT:-3000}

python -m trainer fit --out "$RUN" --no-progress "$@"
python -m export --checkpoint "$RUN/checkpoint.pt" --out "$BUNDLE" --force

# a few test images of the toy world's shifted domain, to send to the service
python - <<'PY'
from pathlib import Path
from trainer.toyworld.task import toy_task
task = toy_task()
out = Path("runs/samples"); out.mkdir(parents=True, exist_ok=True)
for ds, tag in ((task.test, "base"), (task.novel_test, "novel")):
    for i in range(0, len(ds), max(1, len(ds) // 4))[:4]:
        image, label = ds[i]
        image.resize((128, 128)).save(out / f"{tag}-{ds.class_names[label].replace(' ', '_')}.png")
print("sample images:", ", ".join(sorted(p.name for p in out.glob("*.png"))))
PY

if [ "${SERVE:-1}" = "0" ]; then exit 0; fi
export FLATPROMPT_BUNDLE="$PWD/$BUNDLE"
export FLATPROMPT_TOKEN=${FLATPROMPT_TOKEN:-demo-token}
export FLATPROMPT_REGISTRY_URL=${FLATPROMPT_REGISTRY_URL:-sqlite:///$PWD/runs/registry.db}
cat <<MSG

Serving $BUNDLE on http://127.0.0.1:$PORT (token: $FLATPROMPT_TOKEN). In another shell:
  curl -s -F images=@runs/samples/$(ls runs/samples | grep '^base' | head -1) 127.0.0.1:$PORT/classify
  curl -s -H "Authorization: Bearer $FLATPROMPT_TOKEN" -H 'content-type: application/json' \\
       -d '{"names": ["white diamond", "pink heart"]}' 127.0.0.1:$PORT/register
  curl -s -F images=@runs/samples/novel-white_diamond.png 127.0.0.1:$PORT/classify
  curl -s 127.0.0.1:$PORT/metrics | grep flatprompt_
MSG
exec bentoml serve serving.service:FlatPrompt --host 127.0.0.1 --port "$PORT"
