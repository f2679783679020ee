#!/usr/bin/env bash
# Build docker/Dockerfile for real and serve one streamed request from it (CPU, no registry):
#   1. tools   buildah and debootstrap (apt-get install when missing and running as root)
#   2. base    a Debian bookworm root filesystem with Python 3.11 (debootstrap --variant=minbase),
#              imported as the image $BASE_IMAGE; made once, then reused from container storage
#   3. build   buildah bud --isolation chroot -f docker/Dockerfile --build-arg BASE=$BASE_IMAGE, with
#              this machine's pip setup (as `pip config list` reports it: one merged pip.conf, plus
#              the certificate bundle, constraints files, wheel folders and file:// indexes it names)
#              mounted read-only into the build; --layers, so a rebuild reuses unchanged steps
#   4. start   the image's entrypoint (vlcache-serve on the bundled artifact) in a working container,
#              as the image's user, bound to 127.0.0.1 on free ports; waits for /v2/health/ready, and
#              runs the image's HEALTHCHECK command inside the container (and, before the server,
#              the entrypoint with another command: vlcache-bench --help)
#   5. request one streamed request from the host with vlcache.client.Client; checks the answer (the
#              digits scene's ground truth), that the cache was compressed and that tokens streamed
#   6. stop    SIGTERM to vlcache-serve inside the container; it stops tritonserver and exits 0
# The server and the working container are removed on every exit path (trap); the images stay
# (cache: `buildah rmi $IMAGE $BASE_IMAGE` removes them). Each phase is timed; the timings are printed.
#
# Needs root (buildah's storage, chroot isolation), the repository's .venv (bash scripts/setup.sh: the
# client side) and network access to PyPI and a Debian mirror as this machine's configuration allows.
# Environment: IMAGE (default localhost/vlcache:check), BASE_IMAGE (localhost/vlcache-check-base:
# bookworm-py311), DEBIAN_MIRROR (http://deb.debian.org/debian), BUILD_TIMEOUT (seconds, 1200),
# READY_TIMEOUT (seconds, 240), OUT (out/check_image: logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
IMAGE=${IMAGE:-localhost/vlcache:check}
BASE_IMAGE=${BASE_IMAGE:-localhost/vlcache-check-base:bookworm-py311}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1200}
READY_TIMEOUT=${READY_TIMEOUT:-240}
OUT=${OUT:-out/check_image}
# libpython3.11: the Triton Python backend stub links against libpython3.11.so (python:3.11 images have it)
BASE_PACKAGES=python3,python3-venv,libpython3.11,ca-certificates

say() { printf 'check_image: %s\n' "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no $PY: run bash scripts/setup.sh first (the client side runs from it)"
[ "$(id -u)" = 0 ] || die "run as root (buildah storage and chroot isolation)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vlcache-check-image.XXXXXX")
LOGS=$WORK/logs  # copied to $OUT on exit
mkdir -p "$LOGS"
CONTAINER=""
SERVER=""

# --- timing ----------------------------------------------------------------------------------------
PHASES=()
T_ALL=$SECONDS
T_PHASE=$SECONDS
PHASE=""
phase() {  # phase NAME: close the running phase, start NAME
    if [ -n "$PHASE" ]; then PHASES+=("$PHASE $((SECONDS - T_PHASE))"); fi
    PHASE=$1
    T_PHASE=$SECONDS
    [ -z "$1" ] || say "== $1"
}
timings() {
    local p
    printf 'check_image: timings (s):'
    for p in "${PHASES[@]}"; do printf ' %s=%s' "${p% *}" "${p##* }"; done
    printf ' total=%s\n' "$((SECONDS - T_ALL))"
}

# --- the server inside the container ----------------------------------------------------------------
descendants() {  # every process below PID $1 (pids)
    local queue=("$1") pid child
    while [ "${#queue[@]}" -gt 0 ]; do
        pid=${queue[0]}
        queue=("${queue[@]:1}")
        for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
            echo "$child"
            queue+=("$child")
        done
    done
}
stop_server() {  # SIGTERM to vlcache-serve (it stops tritonserver), bounded wait, then SIGKILL what is left
    [ -n "$SERVER" ] || return 0
    local pids pid
    pids=$(descendants "$SERVER")
    for pid in $pids; do
        if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "vlcache-serve "; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for _ in $(seq 1 60); do
        kill -0 "$SERVER" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$SERVER" 2>/dev/null; then
        # tritonserver runs in its own session, so it is collected here too
        say "the server did not stop within 60 s: killing it"
        pids="$pids $(descendants "$SERVER")"
        for pid in $pids $SERVER; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    SERVER_STATUS=0
    wait "$SERVER" 2>/dev/null || SERVER_STATUS=$?
    SERVER=""
    return 0
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_server || true
    if [ -n "$CONTAINER" ]; then buildah rm "$CONTAINER" > /dev/null 2>&1 || true; fi
    { mkdir -p "$OUT" && cp "$LOGS"/* "$OUT"/; } 2>/dev/null || true
    rm -rf "$WORK"
    [ -z "$PHASE" ] || phase ""
    timings
    if [ "$status" != 0 ]; then say "FAILED (status $status); logs in $OUT" >&2; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. tools -----------------------------------------------------------------------------------------
phase tools
missing=()
command -v buildah > /dev/null || missing+=(buildah)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get > /dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    apt-get update -q > "$LOGS/apt.log" 2>&1 || die "apt-get update failed: $OUT/apt.log"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >> "$LOGS/apt.log" 2>&1 ||
        die "apt-get install ${missing[*]} failed: $OUT/apt.log"
fi
say "$(buildah --version)"

# --- 2. base ------------------------------------------------------------------------------------------
phase base
if buildah inspect --type image "$BASE_IMAGE" > /dev/null 2>&1; then
    say "reusing $BASE_IMAGE"
else
    say "debootstrap bookworm ($BASE_PACKAGES) from $DEBIAN_MIRROR"
    rootfs=$WORK/rootfs
    timeout 900 debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR" \
        > "$LOGS/debootstrap.log" 2>&1 || die "debootstrap failed: $OUT/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    CONTAINER=$(buildah from scratch)
    mnt=$(buildah mount "$CONTAINER")
    tar -C "$rootfs" -cf - . | tar -C "$mnt" -xf -
    buildah umount "$CONTAINER" > /dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$CONTAINER"
    buildah commit --quiet "$CONTAINER" "$BASE_IMAGE" > /dev/null
    buildah rm "$CONTAINER" > /dev/null
    CONTAINER=""
    rm -rf "$rootfs"
    say "made $BASE_IMAGE"
fi

# --- 3. build -----------------------------------------------------------------------------------------
phase build
# This machine's pip setup, as pip itself resolves it (files and PIP_* variables), merged into one
# pip.conf for the build; every local path it names is mounted read-only at the same path.
PIP_CONF_IN=/run/vlcache-check/pip.conf
mapfile -t mounts < <("$PY" - "$WORK/pip.conf" << 'EOF'
import os
import re
import subprocess
import sys
from urllib.parse import urlparse

listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
files: dict[str, dict[str, str]] = {}
env: dict[str, str] = {}
for line in listing.stdout.splitlines():
    m = re.match(r"^(.+?)\.([^.=]+)='(.*)'$", line)
    if not m:
        continue
    section, key, value = m.groups()
    if section == ":env:":
        env[key] = value  # PIP_* variables win over files, as in pip
    else:
        files.setdefault(section, {})[key] = value
files.setdefault("global", {}).update(env)
paths = set()
for section in files.values():
    for key, value in section.items():
        for token in value.split():
            path = urlparse(token).path if token.startswith("file:") else token
            if not path.startswith("/") or not os.path.exists(path):
                continue
            if key.endswith("index-url") and os.path.basename(path.rstrip("/")) == "simple":
                path = os.path.dirname(path.rstrip("/"))  # a file:// index: its pages link to ../../files
            paths.add(os.path.realpath(path) if os.path.isfile(path) else path.rstrip("/"))
with open(sys.argv[1], "w") as f:
    for name, section in files.items():
        f.write(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in section.items()))
for path in sorted(paths):
    print(f"{path}:{path}:ro")
EOF
)
[ -s "$WORK/pip.conf" ] || die "could not read this machine's pip setup (pip config list)"
# (keys only: a value such as an index URL may carry credentials)
say "pip setup for the build: $(sed -n 's/^\([^ []*\) = .*/\1/p' "$WORK/pip.conf" | tr '\n' ' ')"
volumes=(-v "$WORK/pip.conf:$PIP_CONF_IN:ro")
for m in "${mounts[@]}"; do volumes+=(-v "$m"); done
say "mounted read-only: ${mounts[*]:-(nothing)}"
timeout "$BUILD_TIMEOUT" buildah bud --isolation chroot --format docker --layers --pull=never \
    -f docker/Dockerfile -t "$IMAGE" \
    --build-arg BASE="$BASE_IMAGE" \
    --build-arg PIP_CONFIG_FILE="$PIP_CONF_IN" \
    --build-arg VLCACHE_TORCH_INDEX= \
    "${volumes[@]}" . > "$LOGS/build.log" 2>&1 || { tail -n 40 "$LOGS/build.log" >&2; die "buildah bud failed: $OUT/build.log"; }
{ grep -E '^STEP|Using cache' "$LOGS/build.log" || true; } | sed 's/^/  /' | cut -c1-150
say "image $IMAGE: $(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)"

# --- 4. start -----------------------------------------------------------------------------------------
phase start
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" -c "
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(('127.0.0.1', 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
")
CONTAINER=$(buildah from --pull=never "$IMAGE")
say "user in the image: $(buildah run --isolation chroot "$CONTAINER" -- id)"
usage=$(buildah run --isolation chroot "$CONTAINER" -- /usr/local/bin/vlcache-entrypoint vlcache-bench --help) ||
    die "the entrypoint did not run vlcache-bench --help"
say "the entrypoint runs other commands: ${usage%%$'\n'*}"
buildah run --isolation chroot \
    --env VLCACHE_HOST=127.0.0.1 --env VLCACHE_HTTP_PORT="$HTTP_PORT" \
    --env VLCACHE_GRPC_PORT="$GRPC_PORT" --env VLCACHE_METRICS_PORT="$METRICS_PORT" \
    "$CONTAINER" -- /usr/local/bin/vlcache-entrypoint > "$LOGS/serve.log" 2>&1 &
SERVER=$!
deadline=$((SECONDS + READY_TIMEOUT))
until "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready', timeout=2)" 2> /dev/null; do
    kill -0 "$SERVER" 2> /dev/null || { cat "$LOGS/serve.log" >&2; die "the server exited before it was ready"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 40 "$LOGS/serve.log" >&2; die "not ready after $READY_TIMEOUT s"; }
    sleep 1
done
grep "vlcache-serve:" "$LOGS/serve.log" | sed 's/^/  /'
# The image's own HEALTHCHECK command, run inside the container against the running server.
health=$(buildah inspect --type image "$IMAGE" | "$PY" -c "
import json, shlex, sys
test = json.load(sys.stdin)['Docker']['config']['Healthcheck']['Test']
assert test[0] == 'CMD', test
print(shlex.join(test[1:]))
")
eval "buildah run --isolation chroot --env VLCACHE_HTTP_PORT=$HTTP_PORT \"\$CONTAINER\" -- $health" ||
    die "the image's HEALTHCHECK failed against the running server"
say "HEALTHCHECK passed (${health:0:60}...)"

# --- 5. request ---------------------------------------------------------------------------------------
phase request
"$PY" - "127.0.0.1:$GRPC_PORT" << 'EOF' 2>&1 | tee "$LOGS/request.log"
import sys

from vlcache.client import Client
from vlcache.digits import DigitScenes, parse_answer

# The README's question: scene 3 of the digits test split, "what is at row 1 col 2 ?"
image, grid = DigitScenes("test").scene(3)
expected = str(int(grid[1, 2]))
pieces: list[str] = []
with Client(sys.argv[1], timeout=120) as client:
    client.wait_ready(30)
    g = client.generate(image, "what is at row 1 col 2 ?", max_tokens=4, on_text=pieces.append)
s = g.stats
print(f"streamed {g.responses} text responses {pieces!r}; answer {g.text!r} (expected {expected})")
print(
    f"backend {s['backend']}, method {s['method']}, budget {s['budget']}: KV {s['kv_tokens_kept']}/{s['kv_tokens_total']}"
    f" entries kept, {s['kv_bytes_before']} -> {s['kv_bytes_after']} bytes; TTFT {g.ttft:.3f} s, latency {g.latency:.3f} s"
)
problems = []
if parse_answer(g.text) != expected:
    problems.append(f"answer {parse_answer(g.text)!r} != {expected!r}")
if g.responses < 1 or not pieces:
    problems.append("nothing streamed")
if not 0 < s["kv_tokens_kept"] < s["kv_tokens_total"]:
    problems.append("the KV cache was not compressed")
if s["backend"] != "onnx":
    problems.append(f"backend {s['backend']}")
if problems:
    sys.exit("request check failed: " + "; ".join(problems))
print("request check passed")
EOF

# --- 6. stop ------------------------------------------------------------------------------------------
phase stop
SERVER_STATUS=""
stop_server
grep -E "vlcache-serve: (stopping|tritonserver stopped)" "$LOGS/serve.log" | sed 's/^/  /' || true
[ "$SERVER_STATUS" = 0 ] || die "the server exited with status $SERVER_STATUS (log $OUT/serve.log)"
buildah rm "$CONTAINER" > /dev/null
CONTAINER=""
phase ""
say "passed: $IMAGE built from docker/Dockerfile on $BASE_IMAGE serves the bundled artifact"
