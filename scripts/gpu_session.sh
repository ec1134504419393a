#!/usr/bin/env bash
# A lent GPU machine (torch+CUDA, transformers, PEFT, accelerate; no TRL, datasets, math-verify,
# vLLM, registry or network) runs align's GPU check in one call. Two steps:
#
#   bash scripts/gpu_session.sh prepare        # here, on the CPU machine: fills .gpu/ (~25 MB)
#   bash scripts/gpu_session.sh run [ARGS]     # there, in the repository root: installs .gpu/'s
#                                              # wheels with --target, runs scripts/gpu_check.py
#
# .gpu/ (ignored through .git/info/exclude) holds the pinned wheels for Python 3.12, the HH-RLHF
# and IMDB data of ../shared, and the base's config and tokenizer files (no weights: `run`
# defaults to --random-weights in that shape: crashes and speed, not accuracy). For real weights,
# bring the GGUF in parts and pass --model .gpu/model.gguf. The machine's own huggingface_hub is
# kept. Writes results/gpu_check_cuda*.json (never over an earlier one).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
WHEELS=(trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash fsspec math-verify==0.9.0
        latex2sympy2_extended antlr4-python3-runtime==4.13.2 gguf transformers==5.19.0 tokenizers)

case "${1:-}" in
  prepare)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    mkdir -p "$GPU/wheels" "$GPU/shared" "$GPU/model-shape"
    PY=${PYTHON:-.venv/bin/python}
    # the unpinned names at the versions this venv runs (the tested stack)
    mapfile -t PINNED < <("$PY" -c "import sys; from importlib import metadata as m
for w in sys.argv[1:]: print(w if '==' in w else f'{w}=={m.version(w)}')" "${WHEELS[@]}")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d "$GPU/wheels" "${PINNED[@]}"
    shared=$("$PY" -c "from align.assets import shared_dir; print(shared_dir())")
    cp -r "$shared/data" "$GPU/shared/"
    model=$("$PY" -c "from align.assets import DEFAULT_MODEL_ID, resolve_model; print(resolve_model(DEFAULT_MODEL_ID))")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
      [ -f "$model/$f" ] && cp "$model/$f" "$GPU/model-shape/"
    done
    du -sh "$GPU"
    echo "carry: $GPU (run with: bash scripts/gpu_session.sh run)"
    ;;
  run)
    shift
    [ -d "$GPU/wheels" ] || { echo "gpu_session: no $GPU/wheels; run 'prepare' first and carry $GPU" >&2; exit 2; }
    SITE="$GPU/site"
    PY=${PYTHON:-python}
    if [ ! -d "$SITE" ]; then
      "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$GPU"/wheels/*.whl
    fi
    export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}" ALIGN_SHARED="$PWD/$GPU/shared"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    if [ $# -eq 0 ]; then
      set -- --random-weights --model "$GPU/model-shape"
    fi
    "$PY" scripts/gpu_check.py "$@"
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh prepare | run [gpu_check.py arguments]" >&2
    exit 2
    ;;
esac
