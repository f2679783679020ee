#!/usr/bin/env bash
# Create .venv and install vlcache with its dev tools, CPU-only. Idempotent; safe on a fresh machine.
# torch is installed first as the pinned CPU wheel: an unpinned `torch` could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${VLCACHE_EXTRAS:-dev,eval,plugins,onnx,serve}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[${EXTRAS}]"
.venv/bin/python -c "import torch, transformers, numpy, vlcache; print('vlcache', vlcache.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
