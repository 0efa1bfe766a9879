#!/usr/bin/env bash
# bench-http.sh: the HTTP forward-auth cache hit (--http-listen) against a no-op forward-auth
# server on the same hyper stack that answers with the very same Authorization bytes, as a
# throughput ratio. Both servers are pinned to CPU 0, h2load (HTTP/1.1 keep-alive, 8
# connections) to CPU 1, its own CPU shown; BENCH_PAIRS alternating pairs (default 5), median
# reported. Writes bench/http-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_SCRIPT=bench-http.sh
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
REQUESTS=${BENCH_REQUESTS:-200000}
CONNECTIONS=8
OUT=bench/http-results.md

build --bin phantom-authz --example scripted_idp --example noop_forward_auth

start_example scripted_idp --listen 127.0.0.1:0 --jwt-bytes 1000 --max-age 300
IDP=$ADDR
start_phantom --http-listen 127.0.0.1:0
PA=$PA_HTTP
[ -n "$PA" ] || die "phantom-authz did not report its HTTP listener"

# The hot token's answer, which the no-op repeats byte for byte.
curl -sS -D "$WORK/headers" -o /dev/null -H 'authorization: Bearer hot-token' "http://$PA/authz"
grep -i '^authorization:' "$WORK/headers" | cut -d' ' -f2- | tr -d '\r' >"$WORK/authorization"
[ -s "$WORK/authorization" ] || die "phantom-authz did not allow the hot token"
start_example noop_forward_auth --listen 127.0.0.1:0 --authorization-file "$WORK/authorization"
NOOP=$ADDR
NOOP_PID=$PID
log "phantom-authz http=$PA, no-op $NOOP, IdP $IDP"

http() { # http TARGET PID: "req/s cpu% server-µs"
    h2load_run h2load "$2" --h1 -n "$REQUESTS" -c "$CONNECTIONS" -H 'authorization: Bearer hot-token' "http://$1/authz"
}
base() { http "$NOOP" "$NOOP_PID"; }
hit() { http "$PA" "$PA_PID"; }
LOAD_BEFORE=$(loadavg)
base >/dev/null; hit >/dev/null # warm both: connections, caches, page faults
alternate base hit
MEDIAN=$(median "${RATIOS[@]}")
{
    echo "# HTTP forward-auth: cache hit vs. a no-op on the same stack"
    echo
    echo "Measured $(date -u +%Y-%m-%d) by \`scripts/bench-http.sh\` on $(nproc) vCPUs ($(lscpu | sed -n 's/^Model name: *//p'))."
    echo "Servers on CPU $SERVER_CPU, h2load (HTTP/1.1 keep-alive, $CONNECTIONS connections, $REQUESTS requests a run) on CPU $LOAD_CPU;"
    echo "the no-op answers with the same $(wc -c <"$WORK/authorization") Authorization bytes. Load average before → after: $LOAD_BEFORE → $(loadavg)."
    echo
    echo "| pair | no-op req/s | h2load CPU | no-op CPU µs/request | phantom-authz req/s | h2load CPU | phantom-authz CPU µs/request | req/s ratio | CPU ratio |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for i in "${!RATIOS[@]}"; do
        echo "| $((i + 1)) | ${BASE_V[$i]} | ${BASE_CPU[$i]} % | ${BASE_US[$i]} | ${SUBJ_V[$i]} | ${SUBJ_CPU[$i]} % |" \
             "${SUBJ_US[$i]} | ${RATIOS[$i]} | ${US_RATIOS[$i]} |"
    done
    echo
    echo "Median ratio: **$MEDIAN** (spread $(spread "${RATIOS[@]}"); goal ≥ 0.85); from the servers' CPU time" \
         "per request (no-op ÷ phantom-authz): $(median "${US_RATIOS[@]}") (spread $(spread "${US_RATIOS[@]}"))."
} >"$OUT"
log "median ratio $MEDIAN; written to $OUT"
