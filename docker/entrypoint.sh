#!/bin/sh
# Entrypoint of the vlcache images (docker/Dockerfile, docker/Dockerfile.gpu).
#
#   (no arguments) or arguments starting with "-":
#       vlcache-serve "$VLCACHE_ARTIFACT" --host "$VLCACHE_HOST" --grpc-port "$VLCACHE_GRPC_PORT"
#           --http-port "$VLCACHE_HTTP_PORT" --metrics-port "$VLCACHE_METRICS_PORT" [ARGUMENTS...]
#       e.g. `docker run IMAGE --instances 2`
#   anything else: run it as a command, e.g. `docker run IMAGE vlcache-bench --url server:8001`
#
# Environment (defaults set by the image): VLCACHE_ARTIFACT (/models/artifact: mount another artifact
# directory there, or point this at one), VLCACHE_HOST (0.0.0.0), VLCACHE_HTTP_PORT (8000),
# VLCACHE_GRPC_PORT (8001), VLCACHE_METRICS_PORT (8002).
# When the artifact has no manifest.json and VLCACHE_BUILD_ON_START=1 (the GPU image: TensorRT
# engines are built on the GPU that runs them), it is built first:
#   vlcache-build --model "$VLCACHE_MODEL" --backend "$VLCACHE_BACKEND" --budget "$VLCACHE_BUDGET"
# An artifact of the trtllm backend is TensorRT-LLM's own llmapi Triton model, which vlcache-serve
# does not host: the image's tritonserver serves its triton/ repository directly, on the same ports.
set -eu

case "${1:-}" in
    "" | -*) ;;
    *) exec "$@" ;;
esac

artifact=${VLCACHE_ARTIFACT:-/models/artifact}
if [ ! -f "$artifact/manifest.json" ]; then
    if [ "${VLCACHE_BUILD_ON_START:-0}" = 1 ]; then
        echo "vlcache-entrypoint: no artifact in $artifact; building ${VLCACHE_MODEL:-llava-tiny} (backend ${VLCACHE_BACKEND:-auto})" >&2
        vlcache-build --model "${VLCACHE_MODEL:-llava-tiny}" --backend "${VLCACHE_BACKEND:-auto}" \
            --budget "${VLCACHE_BUDGET:-0.1}" --out "$artifact"
    else
        echo "vlcache-entrypoint: no artifact in $artifact (no manifest.json): mount one there, or set VLCACHE_ARTIFACT" >&2
        exit 2
    fi
fi

backend=$(python3 -c 'import json, pathlib, sys; p = pathlib.Path(sys.argv[1])
print(json.loads(p.read_text()).get("build", {}).get("backend", "") if p.is_file() else "")' "$artifact/manifest.json")
if [ "$backend" = trtllm ]; then
    host=${VLCACHE_HOST:-0.0.0.0}
    exec tritonserver --model-repository "$artifact/triton" \
        --http-address "$host" --grpc-address "$host" --metrics-address "$host" \
        --http-port "${VLCACHE_HTTP_PORT:-8000}" \
        --grpc-port "${VLCACHE_GRPC_PORT:-8001}" \
        --metrics-port "${VLCACHE_METRICS_PORT:-8002}" \
        "$@"
fi

exec vlcache-serve "$artifact" \
    --host "${VLCACHE_HOST:-0.0.0.0}" \
    --grpc-port "${VLCACHE_GRPC_PORT:-8001}" \
    --http-port "${VLCACHE_HTTP_PORT:-8000}" \
    --metrics-port "${VLCACHE_METRICS_PORT:-8002}" \
    "$@"
