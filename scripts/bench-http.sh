#!/usr/bin/env bash
# bench-http.sh: the HTTP forward-auth cache hit (--http-listen) against a no-op forward-auth
# server on the same hyper stack that answers with the very same Authorization bytes, as a
# throughput ratio. Both servers are pinned to CPU 0, h2load (HTTP/1.1 keep-alive, 8
# connections) to CPU 1; BENCH_PAIRS alternating pairs (default 5), medians reported. Writes
# bench/http-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${BENCH_PAIRS:-5}
REQUESTS=${BENCH_REQUESTS:-200000}
CONNECTIONS=8
OUT=bench/http-results.md

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench-http.sh: %s\n' "$*" >&2; exit 1; }
need() { # need COMMAND DEBIAN_PACKAGE
    command -v "$1" >/dev/null 2>&1 && return
    log "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
}
need h2load nghttp2-client
need taskset util-linux
need curl curl
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs"

log "building release binaries"
cargo build --locked --release --bin phantom-authz --example scripted_idp --example noop_forward_auth
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
    cat "$1" >&2 || true
    die "timed out waiting for '$2' in $1"
}

taskset -c 0 "$BIN/examples/scripted_idp" --listen 127.0.0.1:0 --jwt-bytes 1000 --max-age 300 \
    >"$WORK/idp.out" 2>&1 &
PIDS+=("$!")
IDP=$(wait_for "$WORK/idp.out" '^listening ' | cut -d' ' -f2)

NO_COLOR=1 RUST_LOG=warn,phantom_authz=info PHANTOM_AUTHZ_CLIENT_SECRET=bench \
    taskset -c 0 "$BIN/phantom-authz" --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --http-listen 127.0.0.1:0 --introspection-url "http://$IDP/oauth/v2/oauth-introspect" \
    --client-id bench 2>"$WORK/pa.err" &
PIDS+=("$!")
PA=$(wait_for "$WORK/pa.err" 'HTTP forward-auth listening' | grep -oE 'http=[0-9.:]+' | cut -d= -f2)

# The hot token's answer, which the no-op repeats byte for byte.
curl -sS -D "$WORK/headers" -o /dev/null -H 'authorization: Bearer hot-token' "http://$PA/authz"
grep -i '^authorization:' "$WORK/headers" | cut -d' ' -f2- | tr -d '\r' >"$WORK/authorization"
[ -s "$WORK/authorization" ] || die "phantom-authz did not allow the hot token"
taskset -c 0 "$BIN/examples/noop_forward_auth" --listen 127.0.0.1:0 \
    --authorization-file "$WORK/authorization" >"$WORK/noop.out" 2>&1 &
PIDS+=("$!")
NOOP=$(wait_for "$WORK/noop.out" '^listening ' | cut -d' ' -f2)
log "phantom-authz http=$PA, no-op $NOOP, IdP $IDP"

# load TARGET: one h2load run; prints "req/s cpu%" (h2load's own CPU, to show it is not the
# bottleneck: one core is 100%).
load() {
    local started_cpu ended_cpu out rps
    out=$( { TIMEFORMAT='%U %S %R'; time taskset -c 1 h2load --h1 -n "$REQUESTS" -c "$CONNECTIONS" \
        -H 'authorization: Bearer hot-token' "http://$1/authz" >"$WORK/h2load.out"; } 2>&1 )
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$WORK/h2load.out")
    grep -q "succeeded, 0 errored, 0 timeout" "$WORK/h2load.out" ||
        grep -q "0 failed, 0 errored" "$WORK/h2load.out" || die "h2load saw errors: $(cat "$WORK/h2load.out")"
    awk -v rps="$rps" -v t="$out" 'BEGIN { split(t, a, " "); printf "%.0f %.0f\n", rps, 100 * (a[1] + a[2]) / a[3] }'
}

# Warm both (connections, caches, page faults).
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
    log "pair $pair: no-op $noop req/s (h2load CPU ${noop_cpu}%), phantom-authz $pa req/s (${pa_cpu}%), ratio $ratio"
    ROWS+=("| $pair | $noop | $noop_cpu % | $pa | $pa_cpu % | $ratio |")
done
MEDIAN=$(printf '%s\n' "${ROWS[@]}" | awk -F'|' '{ print $7 }' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
{
    echo "# HTTP forward-auth: cache hit vs. a no-op on the same stack"
    echo
    echo "Measured $(date -u +%Y-%m-%d) by \`scripts/bench-http.sh\` on $(nproc) vCPUs ($(lscpu | sed -n 's/^Model name: *//p'))."
    echo "Servers on CPU 0, h2load (HTTP/1.1 keep-alive, $CONNECTIONS connections, $REQUESTS requests a run) on CPU 1;"
    echo "the no-op answers with the same $(wc -c <"$WORK/authorization") Authorization bytes. Load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| pair | no-op req/s | h2load CPU | phantom-authz req/s | h2load CPU | ratio |"
    echo "| --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Median ratio: **$MEDIAN** (goal ≥ 0.85)."
} >"$OUT"
log "median ratio $MEDIAN; written to $OUT"
