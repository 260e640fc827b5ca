#!/usr/bin/env bash
# The test command of README.md and CI: set up (idempotent), lint, run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not server"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SPECAPPROX_VENV:-$(pwd)/.venv}
echo "[test] ruff check"
"$VENV/bin/ruff" check .
echo "[test] pytest"
# Model-dependent tests fail instead of skipping here: a missing model is a setup bug.
export SPECAPPROX_REQUIRE_MODEL=1
exec "$VENV/bin/python" -m pytest -q -rs --timeout 1200 "$@"
