#!/usr/bin/env bash
# Sets segvit up in the current Python environment and builds its extension.
# A torch (or triton) already installed is kept, e.g. a CUDA build; otherwise the CPU build of torch 2.13.0 and
# triton 3.8.0 are installed. The extension compiles against that torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check "$@"; }

"$PYTHON" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
if [ "$(uname -s)" = Linux ]; then
  "$PYTHON" -c "import triton" 2>/dev/null || pip_install triton==3.8.0
fi
pip_install "setuptools>=64" wheel ninja numpy pybind11
pip_install --no-build-isolation -e ".[test,bench,hub,tensorboard,onnx]"
"$PYTHON" -m segvit.info
