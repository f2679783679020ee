#!/usr/bin/env bash
# The main job on a CPU machine, end to end (run scripts/setup.sh first):
#   1. vlcache-build: the bundled llava-tiny at budget 0.1 -> artifacts/llava-tiny (ONNX Runtime graphs)
#   2. vlcache-generate: the same question about a digits scene answered with the full cache and at
#      budget 0.1, streamed, then both answers and their KV bytes side by side
#   3. vlcache-serve: a real Triton Inference Server on 127.0.0.1 (CPU)
#   4. vlcache-bench: budgets 1.0 and 0.1 side by side over gRPC; the table, then the server stops.
# Environment: MODEL (default llava-tiny), ARTIFACT (artifacts/llava-tiny), GRPC_PORT (default 8001), REQUESTS (default 32), CONCURRENCY (default 4), OUT (default out/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
GRPC_PORT=${GRPC_PORT:-8001}
OUT=${OUT:-out/quickstart}
MODEL=${MODEL:-llava-tiny}
ARTIFACT=${ARTIFACT:-artifacts/llava-tiny}

$BIN/vlcache-build --model "$MODEL" --budget 0.1 --out "$ARTIFACT" --force
$BIN/vlcache-generate "$ARTIFACT" --image digits:3 --prompt "what is at row 1 col 2 ?" --max-tokens 4 --budget 1.0,0.1

mkdir -p "$OUT"
$BIN/vlcache-serve "$ARTIFACT" --grpc-port "$GRPC_PORT" --http-port 0 --metrics-port 0 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    grep -q "ready: gRPC" "$OUT/serve.log" && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
    sleep 1
done
grep "vlcache-serve:" "$OUT/serve.log"
$BIN/vlcache-bench --url "127.0.0.1:$GRPC_PORT" --budgets 1.0,0.1 --requests "${REQUESTS:-32}" \
    --concurrency "${CONCURRENCY:-4}" --max-tokens 4 --out "$OUT/bench" --force
