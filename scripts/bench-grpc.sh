#!/usr/bin/env bash
# bench-grpc.sh: the ext_authz local-cache hit against the no-op ext_authz server answering with
# the very same Authorization bytes, driven by h2load (gRPC over HTTP/2: 8 connections, 16
# streams each, a pre-encoded CheckRequest), as a throughput ratio. Both servers are pinned to
# CPU 0, h2load to CPU 1; BENCH_PAIRS alternating pairs (default 5), median reported. h2load's
# own CPU is shown, to tell when it, not the server, is the limit. Writes bench/grpc-results.md.
# Needs Python's xds-protos to encode the request (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${BENCH_PAIRS:-5}
REQUESTS=${BENCH_REQUESTS:-400000}
OUT=bench/grpc-results.md

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench-grpc.sh: %s\n' "$*" >&2; exit 1; }
command -v h2load >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
python3 -c "import envoy.service.auth.v3.external_auth_pb2" 2>/dev/null ||
    python3 -m pip install --quiet "xds-protos==1.85.0" ||
    python3 -m pip install --quiet --break-system-packages "xds-protos==1.85.0"
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs"

cargo build --locked --release --bin phantom-authz --example scripted_idp --example noop_authz
BIN=${CARGO_TARGET_DIR:-target}/release
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
wait_for() { # wait_for FILE REGEX: the first matching line, within 20 s
    local i
    for i in $(seq 200); do
        if grep -qE "$2" "$1" 2>/dev/null; then
            grep -m1 -E "$2" "$1" | sed 's/\x1b\[[0-9;]*m//g'
            return
        fi
        sleep 0.1
    done
    die "timed out waiting for '$2' in $1"
}

# The Check Envoy sends, as one gRPC message (5-byte frame header + protobuf).
python3 - "$WORK/check.bin" <<'PY'
import struct, sys
from envoy.service.auth.v3 import external_auth_pb2
request = external_auth_pb2.CheckRequest()
http = request.attributes.request.http
http.method, http.path, http.host = "GET", "/api/orders", "api.example"
http.headers["authorization"] = "Bearer hot-token"
http.headers["x-request-id"] = "bench"
body = request.SerializeToString()
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(body)) + body)
PY

taskset -c 0 "$BIN/examples/scripted_idp" --listen 127.0.0.1:0 --jwt-bytes 1000 --max-age 300 \
    >"$WORK/idp.out" 2>&1 &
PIDS+=("$!")
IDP=$(wait_for "$WORK/idp.out" '^listening ' | cut -d' ' -f2)
NO_COLOR=1 RUST_LOG=warn,phantom_authz=info PHANTOM_AUTHZ_CLIENT_SECRET=bench \
    taskset -c 0 "$BIN/phantom-authz" --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --introspection-url "http://$IDP/oauth/v2/oauth-introspect" --client-id bench 2>"$WORK/pa.err" &
PIDS+=("$!")
PA=$(wait_for "$WORK/pa.err" 'phantom-authz listening' | grep -oE 'grpc=[0-9.:]+' | cut -d= -f2)
"$BIN/phantom-authz" check --target "$PA" --token hot-token --show-jwt --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["headers"]["authorization"])' \
    >"$WORK/authorization"
taskset -c 0 "$BIN/examples/noop_authz" --listen 127.0.0.1:0 \
    --authorization-file "$WORK/authorization" >"$WORK/noop.out" 2>&1 &
PIDS+=("$!")
NOOP=$(wait_for "$WORK/noop.out" '^listening ' | cut -d' ' -f2)
log "phantom-authz $PA, no-op $NOOP"

load() { # load TARGET: "req/s h2load-cpu%"
    local times rps
    times=$( { TIMEFORMAT='%U %S %R'; time taskset -c 1 h2load -n "$REQUESTS" -c 8 -m 16 \
        -d "$WORK/check.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://$1/envoy.service.auth.v3.Authorization/Check" >"$WORK/h2load.out"; } 2>&1 )
    grep -q " 0 failed, 0 errored" "$WORK/h2load.out" || die "h2load saw errors: $(cat "$WORK/h2load.out")"
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$WORK/h2load.out")
    awk -v rps="$rps" -v t="$times" 'BEGIN { split(t, a, " "); printf "%.0f %.0f\n", rps, 100 * (a[1] + a[2]) / a[3] }'
}
load "$NOOP" >/dev/null
load "$PA" >/dev/null
ROWS=()
for pair in $(seq "$PAIRS"); do
    if [ $((pair % 2)) -eq 1 ]; then
        read -r noop noop_cpu < <(load "$NOOP"); read -r pa pa_cpu < <(load "$PA")
    else
        read -r pa pa_cpu < <(load "$PA"); read -r noop noop_cpu < <(load "$NOOP")
    fi
    ratio=$(awk -v a="$pa" -v b="$noop" 'BEGIN { printf "%.3f", a / b }')
    log "pair $pair: no-op $noop req/s (h2load ${noop_cpu}%), phantom-authz $pa req/s (${pa_cpu}%), ratio $ratio"
    ROWS+=("| $pair | $noop | $noop_cpu % | $pa | $pa_cpu % | $ratio |")
done
MEDIAN=$(printf '%s\n' "${ROWS[@]}" | awk -F'|' '{ print $7 }' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
{
    echo "# ext_authz gRPC: local-cache hit vs. a no-op writing the same Authorization bytes"
    echo
    echo "Measured $(date -u +%Y-%m-%d) by \`scripts/bench-grpc.sh\` on $(nproc) vCPUs. Servers on CPU 0, h2load"
    echo "(8 connections × 16 streams, $REQUESTS Checks a run) on CPU 1. phantom-authz also returns the caller's"
    echo "dynamic metadata (sub, exp), which the no-op does not. Load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| pair | no-op req/s | h2load CPU | phantom-authz req/s | h2load CPU | ratio |"
    echo "| --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Median ratio: **$MEDIAN** (issue 14's goal: ≥ 0.95)."
} >"$OUT"
log "median ratio $MEDIAN; written to $OUT"
