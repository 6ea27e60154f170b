#!/usr/bin/env bash
# The test command: set up from scratch (if needed), lint, type-check, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy trainer export serving
pytest -q "$@"
