#!/usr/bin/env bash
# The test command: set up from scratch (if needed), lint, type-check, run the test suite.
# The serving tests start a PostgreSQL server and check /metrics with promtool: when either is missing,
# they are installed from Debian's packages (postgresql, prometheus) if this runs as root with apt-get;
# otherwise the tests that need them fail and say what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "warning: missing system packages ${need[*]} (install them with apt-get as root); tests that need them will fail" >&2
  fi
fi
bash scripts/bootstrap.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy trainer export serving
pytest -q "$@"
