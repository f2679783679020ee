#!/usr/bin/env bash
# The first GPU, one command: vlcache's GPU tests, TensorRT (and TensorRT-LLM, where installed) builds of
# llava-tiny, their answers against ONNX Runtime's, a served benchmark at budgets 1.0 and 0.1, and one
# report (out/gpu_check/report.{json,md}). About 10 minutes at most on one GPU; on a machine without
# one every GPU step is reported as skipped, with the reason, and the exit status is 0.
#
#   bash scripts/gpu_check.sh                    # options: bash scripts/gpu_check.sh --help
#   bash scripts/gpu_check.sh --require-gpu      # exit 3 when no GPU step could run
#
# The logic is scripts/gpu_check.py (tests/test_gpu_check.py); docs/gpu-check.md describes it.
# PYTHON: the interpreter whose environment has vlcache (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check.py "$@"
