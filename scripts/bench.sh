#!/usr/bin/env bash
# bench.sh: phantom-authz hot-path benchmark, one machine, loopback only; writes bench/results.md.
#
# Starts a real redis-server, the scripted IdP, the no-op ext_authz baseline (answering with the
# very Authorization bytes phantom-authz answers for the hot token, reading the request as
# phantom-authz reads it: `noop_authz --lean`) and phantom-authz, all pinned to CPU 0; the load
# runs on CPU 1. Throughput is measured with h2load (gRPC over HTTP/2: 8 connections × 16
# streams, one pre-encoded CheckRequest), its own CPU shown; the Rust loadgen only drives what
# h2load cannot: fixed-rate latency, and misses, where the token must change per request. The
# local hit is also set against tonic's generated no-op. Every ratio comes from BENCH_PAIRS
# alternating pairs (default 5) in one run; medians and spreads are reported.
#
#   scripts/bench.sh                 # ~10 minutes after the build
#   BENCH_PAIRS=3 scripts/bench.sh
set -euo pipefail

cd "$(dirname "$0")/.."
BENCH_SCRIPT=bench.sh
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
REQUESTS=${BENCH_REQUESTS:-400000}
DURATION=${BENCH_DURATION:-5s}
WARMUP=${BENCH_WARMUP:-1s}
FILL=${BENCH_FILL_TOKENS:-100000}
JWT_BYTES=1000
IDP_DELAY=5ms
# Longer than the whole run, as is --max-cache-ttl for the phantom-authz that writes the hot
# token's Redis entry (5 min by default): the entry must not expire between the Redis-hit runs.
MAX_AGE=3600
CONNECTIONS=8
STREAMS=16
OUT=bench/results.md
need redis-server redis-server
need redis-cli redis-tools

build --bin phantom-authz --example scripted_idp --example noop_authz --example loadgen
for exe in "$BIN/phantom-authz" "$BIN/examples/scripted_idp" "$BIN/examples/noop_authz" "$BIN/examples/loadgen"; do
    [ -x "$exe" ] || die "missing $exe after the build"
done

idp_stat() { curl -sf "http://$IDP/stats" | awk -v k="$1" '$1 == k { print $2 }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
metric() { curl -sf "http://$PA_ADMIN/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
# metric_sum NAME: a metric summed over its labels.
metric_sum() {
    curl -sf "http://$PA_ADMIN/metrics" \
        | awk -v k="$1" 'index($1, k) == 1 && substr($1, length(k) + 1, 1) ~ /^[{]?$/ { n += $2 } END { print n + 0 }'
}

# grpc TARGET PID: h2load at saturation, the hot token's Check; "req/s cpu% server-µs".
grpc() {
    h2load_run h2load "$2" -n "$REQUESTS" -c "$CONNECTIONS" -m "$STREAMS" -d "$WORK/check.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://$1/envoy.service.auth.v3.Authorization/Check"
}
# loadgen NAME TARGET ARGS...: one measured loadgen run, its JSON in $WORK/NAME.out; "cpu%".
loadgen() {
    local name=$1 target=$2; shift 2
    timed "$name" "$BIN/examples/loadgen" --target "http://$target" \
        --duration "$DURATION" --warmup "$WARMUP" --json "$@"
}
# get NAME FIELD: a number from a loadgen JSON result.
get() { grep -oE "\"$2\":[^,}]*" "$WORK/$1.out" | cut -d: -f2; }

# --- servers -------------------------------------------------------------------------------
REDIS_PORT=$(free_port)
log "starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence)"
"${PRIO[@]}" taskset -c "$SERVER_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
    --appendonly no --protected-mode yes --daemonize no >"$WORK/redis.out" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_for "$WORK/redis.out" 'Ready to accept connections' >/dev/null
REDIS="redis://127.0.0.1:$REDIS_PORT"
head -c 32 /dev/urandom | base64 >"$WORK/cache-secret"

start_example scripted_idp --listen 127.0.0.1:0 --delay "$IDP_DELAY" --jwt-bytes "$JWT_BYTES" --max-age "$MAX_AGE"
IDP=$ADDR
"$BIN/examples/loadgen" --write-check "$WORK/check.bin" --token hot-token

start_phantom --redis-url "$REDIS" --cache-secret-file "$WORK/cache-secret" --max-cache-ttl 1h
# The hot token's answer, which the no-op repeats byte for byte.
"$BIN/phantom-authz" check --target "$PA_GRPC" --token hot-token --show-jwt --json |
    sed -n 's/.*"authorization": *"\([^"]*\)".*/\1/p' >"$WORK/authorization"
[ -s "$WORK/authorization" ] || die "phantom-authz did not allow the hot token"
AUTH_BYTES=$(tr -d '\n' <"$WORK/authorization" | wc -c)
start_example noop_authz --listen 127.0.0.1:0 --authorization-file "$WORK/authorization" --lean
NOOP=$ADDR
NOOP_PID=$PID
# tonic's generated server, for comparison: Envoy's whole CheckRequest decoded, a CheckResponse
# built and encoded per Check.
start_example noop_authz --listen 127.0.0.1:0 --authorization-file "$WORK/authorization"
STOCK=$ADDR
STOCK_PID=$PID
log "IdP $IDP, no-op baseline $NOOP, phantom-authz $PA_GRPC; Authorization: $AUTH_BYTES bytes"

# --- throughput: local-cache hit -----------------------------------------------------------
LOAD_BEFORE=$(loadavg)
log "local-cache hit vs. no-op, h2load (load $LOAD_BEFORE)"
base() { grpc "$NOOP" "$NOOP_PID"; }
local_hit() { grpc "$PA_GRPC" "$PA_PID"; }
base >/dev/null; local_hit >/dev/null # warm both: connections, caches, page faults
alternate base local_hit
L_BASE=("${BASE_V[@]}"); L_BASE_CPU=("${BASE_CPU[@]}"); L_PA=("${SUBJ_V[@]}"); L_PA_CPU=("${SUBJ_CPU[@]}")
L_RATIOS=("${RATIOS[@]}"); L_BASE_US=("${BASE_US[@]}"); L_PA_US=("${SUBJ_US[@]}"); L_US_RATIOS=("${US_RATIOS[@]}")
L_LOAD="$LOAD_BEFORE → $(loadavg)"
BASE_SAT=$(median "${L_BASE[@]}")
log "local-cache hit vs. tonic's generated no-op, h2load"
stock() { grpc "$STOCK" "$STOCK_PID"; }
stock >/dev/null
alternate stock local_hit
S_RATIO=$(median "${RATIOS[@]}"); S_RATIOS=("${RATIOS[@]}"); S_US_RATIO=$(median "${US_RATIOS[@]}")
S_US_RATIOS=("${US_RATIOS[@]}"); S_BASE_US=$(median "${BASE_US[@]}"); S_PA_US=$(median "${SUBJ_US[@]}")
L_LOAD="$L_LOAD; then $(loadavg)"
HALF=$(calc "$BASE_SAT / 2" 0)

# --- latency at half the baseline's saturation (loadgen: fixed rate) ---------------------------
LOAD_BEFORE=$(loadavg)
log "p99 at $HALF req/s (half the no-op's h2load saturation), loadgen"
base_half() { local cpu; cpu=$(loadgen base_half "$NOOP" --tokens same --rate "$HALF"); echo "$(calc "$(get base_half p99_ms)" 3) $cpu"; }
local_half() { local cpu; cpu=$(loadgen local_half "$PA_GRPC" --tokens same --rate "$HALF"); echo "$(calc "$(get local_half p99_ms)" 3) $cpu"; }
alternate base_half local_half
H_BASE=("${BASE_V[@]}"); H_PA=("${SUBJ_V[@]}"); H_CPU=("${BASE_CPU[@]}" "${SUBJ_CPU[@]}")
H_DELTAS=(); for i in "${!H_BASE[@]}"; do H_DELTAS+=("$(calc "${H_PA[$i]} - ${H_BASE[$i]}" 3)"); done
H_LOAD="$LOAD_BEFORE → $(loadavg)"

# --- a miss, one in flight, vs. the IdP alone ----------------------------------------------------
LOAD_BEFORE=$(loadavg)
log "miss, one request in flight (unique tokens, IdP delay $IDP_DELAY)"
# An unmeasured warm-up opens the introspection client's connections first.
"${PRIO[@]}" taskset -c "$LOAD_CPU" "$BIN/examples/loadgen" --target "http://$PA_GRPC" --tokens unique \
    --duration 2s --warmup 0s --json >/dev/null
CONN0=$(idp_stat connections); CALLS0=$(idp_stat calls)
# The IdP alone: 200 calls one at a time on one kept-alive connection; its p50 in ms.
idp_alone() {
    local urls=() cpu
    for _ in $(seq 200); do urls+=(-o /dev/null "http://$IDP/oauth/v2/oauth-introspect"); done
    cpu=$(timed idp_alone curl -s -w '%{time_total}\n' -u bench:bench-secret -d token=alone "${urls[@]}")
    echo "$(sort -n "$WORK/idp_alone.out" | awk '{ t[NR] = $1 } END { printf "%.3f", t[int((NR + 1) / 2)] * 1000 }') $cpu"
}
miss_one() {
    local cpu
    cpu=$(loadgen miss_one "$PA_GRPC" --tokens unique --connections 1 --concurrency 1)
    echo "$(calc "$(get miss_one p50_ms)" 3) $cpu"
}
alternate idp_alone miss_one
M_IDP=("${BASE_V[@]}"); M_PA=("${SUBJ_V[@]}")
M_DELTAS=(); for i in "${!M_IDP[@]}"; do M_DELTAS+=("$(calc "${M_PA[$i]} - ${M_IDP[$i]}" 3)"); done
loadgen miss_sat "$PA_GRPC" --tokens unique >/dev/null
CONN1=$(idp_stat connections); CALLS1=$(idp_stat calls)
MISS_CONNS=$((CONN1 - CONN0)); MISS_CALLS=$((CALLS1 - CALLS0))
M_LOAD="$LOAD_BEFORE → $(loadavg)"
stop "$PA_PID"

# --- throughput: Redis hit ---------------------------------------------------------------------
# Nothing is kept in process, so every Check of the hot token reads Redis itself (Checks share
# a lookup only while an introspection is under way): h2load drives both sides. The server CPU
# of a Redis hit is phantom-authz's and redis-server's together; Redis's own count of GETs shows
# that the Checks read it.
LOAD_BEFORE=$(loadavg)
log "Redis hit (--local-cache-ttl 0, h2load) vs. no-op (h2load)"
start_phantom --redis-url "$REDIS" --cache-secret-file "$WORK/cache-secret" --local-cache-ttl 0 \
    --max-cache-ttl 1h
redis_gets() { redis-cli -p "$REDIS_PORT" info commandstats | sed -n 's/^cmdstat_get:calls=\([0-9]*\),.*/\1/p'; }
redis_hit() { grpc "$PA_GRPC" "$PA_PID,$REDIS_PID"; }
redis_hit >/dev/null # warm: connections, the Redis client's pool
redis_lookups() { metric "phantom_authz_cache_lookups_total{tier=\"redis\",result=\"$1\"}"; }
GETS0=$(redis_gets); HITS0=$(redis_lookups hit); MISSES0=$(redis_lookups miss)
alternate base redis_hit
R_GETS=$(( $(redis_gets) - GETS0 )); R_CHECKS=$((PAIRS * REQUESTS))
R_BASE=("${BASE_V[@]}"); R_BASE_CPU=("${BASE_CPU[@]}"); R_PA=("${SUBJ_V[@]}"); R_PA_CPU=("${SUBJ_CPU[@]}")
R_RATIOS=("${RATIOS[@]}"); R_BASE_US=("${BASE_US[@]}"); R_PA_US=("${SUBJ_US[@]}"); R_US_RATIOS=("${US_RATIOS[@]}")
# A Check finding an introspection under way joins it rather than reading Redis: one starts on
# a Redis miss (the entry expired), error or timeout. Any Check without its GET fails the row.
R_SHORT=$(( R_CHECKS > R_GETS ? R_CHECKS - R_GETS : 0 ))
R_HITS=$(( $(redis_lookups hit) - HITS0 )); R_MISSES=$(( $(redis_lookups miss) - MISSES0 ))
R_ERRORS=$(metric_sum phantom_authz_redis_errors_total)
[ "$R_SHORT" -eq 0 ] || die "$R_CHECKS Redis-hit Checks made only $R_GETS Redis GETs" \
    "(phantom-authz: $R_HITS hits, $R_MISSES misses, $R_ERRORS errors)"
log "Redis hit vs. tonic's generated no-op, h2load"
alternate stock redis_hit
RS_RATIO=$(median "${RATIOS[@]}"); RS_RATIOS=("${RATIOS[@]}"); RS_US_RATIO=$(median "${US_RATIOS[@]}")
RS_US_RATIOS=("${US_RATIOS[@]}"); RS_BASE_US=$(median "${BASE_US[@]}"); RS_PA_US=$(median "${SUBJ_US[@]}")
R_LOAD="$LOAD_BEFORE → $(loadavg)"
stop "$PA_PID"
stop "$NOOP_PID"
stop "$STOCK_PID"

# --- memory per cached token ---------------------------------------------------------------------
log "memory per cached token ($FILL unique tokens, Redis off)"
start_phantom --local-cache-max-entries 200000
# Warm up with the fill's own traffic (unique tokens, same concurrency) so that connection pools,
# HTTP/2 buffers and allocator arenas are already grown: the difference measured below is then
# what the cached tokens themselves cost.
"${PRIO[@]}" taskset -c "$LOAD_CPU" "$BIN/examples/loadgen" --target "http://$PA_GRPC" --tokens unique \
    --requests 5000 --concurrency 128 --warmup 0s --duration 60s --json >/dev/null
sleep 1
RSS0=$(rss_kib "$PA_PID"); ENTRIES0=$(metric phantom_authz_local_cache_entries)
"${PRIO[@]}" taskset -c "$LOAD_CPU" "$BIN/examples/loadgen" --target "http://$PA_GRPC" --tokens unique \
    --requests "$FILL" --concurrency 128 --warmup 0s --duration 300s --json >"$WORK/fill.json"
sleep 1
RSS1=$(rss_kib "$PA_PID"); ENTRIES1=$(metric phantom_authz_local_cache_entries)
CACHED=$(( ${ENTRIES1%.*} - ${ENTRIES0%.*} ))
[ "$CACHED" -gt 0 ] || die "the fill cached nothing: $(cat "$WORK/fill.json")"
BYTES_PER=$(calc "($RSS1 - $RSS0) * 1024 / $CACHED" 0)
log "RSS $RSS0 KiB -> $RSS1 KiB for $CACHED entries: $BYTES_PER B per token"
stop "$PA_PID"

# --- report ----------------------------------------------------------------------------------
signed() { awk "BEGIN { printf \"%+.3f\", $1 }"; }
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**missed**"; fi; }
L_RATIO=$(median "${L_RATIOS[@]}")
L_US_RATIO=$(median "${L_US_RATIOS[@]}")
R_RATIO=$(median "${R_RATIOS[@]}")
R_US_RATIO=$(median "${R_US_RATIOS[@]}")
H_DELTA=$(median "${H_DELTAS[@]}")
M_DELTA=$(median "${M_DELTAS[@]}")
MEM_LIMIT=$((JWT_BYTES + 256))

mkdir -p bench
{
    echo "# phantom-authz benchmark results"
    echo
    echo "Generated by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo
    echo "- Kernel: \`$(uname -srm)\`; CPU: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1) ($(nproc) CPUs)."
    echo "- Servers (redis-server, scripted IdP, no-op baseline, phantom-authz) pinned to CPU $SERVER_CPU;" \
         "load generators pinned to CPU $LOAD_CPU; loopback only; priority: \`${PRIO[*]:-default}\`."
    echo "- Throughput: h2load, $CONNECTIONS connections × $STREAMS streams, $REQUESTS Checks a run, one" \
         "pre-encoded CheckRequest (\`loadgen --write-check\`). The no-op (\`noop_authz --lean\`) reads" \
         "the request as phantom-authz does and answers with one pre-encoded response holding the same" \
         "$AUTH_BYTES Authorization bytes; phantom-authz also sends dynamic metadata (sub, exp)."
    echo "- Latency and misses (the token changes per request): \`examples/loadgen\` (4 connections, 64 in flight," \
         "$WARMUP warm-up + $DURATION measured); fixed-rate latency measured from each request's due time."
    echo "- $PAIRS alternating pairs per goal, in one run; the order flips each pair. IdP: delay $IDP_DELAY," \
         "JWT of about $JWT_BYTES bytes, \`Cache-Control: max-age=$MAX_AGE\`."
    echo "- The machine is shared: load average (1/5/15 min) before → after each part is given with it;" \
         "anything well above 1 means other work took CPU time and the figures are noisier."
    echo
    echo "## Goals"
    echo
    echo "| goal | median | spread over $PAIRS pairs | verdict |"
    echo "| --- | ---: | ---: | --- |"
    echo "| local-hit throughput ÷ same-bytes no-op ≥ 0.95 | $L_RATIO | $(spread "${L_RATIOS[@]}") | $(verdict "$L_RATIO >= 0.95") |"
    echo "| the same, from server CPU time per Check (no-op ÷ phantom-authz) | $L_US_RATIO | $(spread "${L_US_RATIOS[@]}") | $(verdict "$L_US_RATIO >= 0.95") |"
    echo "| *for comparison:* local-hit throughput ÷ tonic's generated no-op | $S_RATIO | $(spread "${S_RATIOS[@]}") | |"
    echo "| *for comparison:* the same, from server CPU time per Check | $S_US_RATIO | $(spread "${S_US_RATIOS[@]}") | |"
    echo "| local-hit p99 at $HALF req/s ≤ no-op p99 + 0.2 ms | $(signed "$H_DELTA") ms | $(spread "${H_DELTAS[@]}") ms | $(verdict "$H_DELTA <= 0.2") |"
    echo "| miss p50, one in flight, ≤ IdP alone + 0.5 ms | $(signed "$M_DELTA") ms | $(spread "${M_DELTAS[@]}") ms | $(verdict "$M_DELTA <= 0.5") |"
    echo "| Redis-hit throughput ÷ no-op ≥ 0.6 | $R_RATIO | $(spread "${R_RATIOS[@]}") | $(verdict "$R_RATIO >= 0.6") |"
    echo "| the same, from server CPU time per Check (no-op ÷ phantom-authz + redis-server) | $R_US_RATIO | $(spread "${R_US_RATIOS[@]}") | $(verdict "$R_US_RATIO >= 0.6") |"
    echo "| *for comparison:* Redis-hit throughput ÷ tonic's generated no-op | $RS_RATIO | $(spread "${RS_RATIOS[@]}") | |"
    echo "| *for comparison:* the same, from server CPU time per Check | $RS_US_RATIO | $(spread "${RS_US_RATIOS[@]}") | |"
    echo "| no new IdP connection per miss after warm-up | $MISS_CONNS for $MISS_CALLS misses | | $(verdict "$MISS_CONNS * 100 < $MISS_CALLS") |"
    echo "| memory per cached token ≤ JWT + 256 B ($MEM_LIMIT B) | $BYTES_PER B | | $(verdict "$BYTES_PER <= $MEM_LIMIT") |"
    echo
    echo "## Local-cache hit vs. no-op (h2load, req/s; load $L_LOAD)"
    echo
    echo "| pair | no-op req/s | h2load CPU | no-op CPU µs/Check | phantom-authz req/s | h2load CPU | phantom-authz CPU µs/Check | req/s ratio | CPU ratio |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for i in "${!L_BASE[@]}"; do
        echo "| $((i + 1)) | ${L_BASE[$i]} | ${L_BASE_CPU[$i]} % | ${L_BASE_US[$i]} | ${L_PA[$i]} | ${L_PA_CPU[$i]} % |" \
             "${L_PA_US[$i]} | ${L_RATIOS[$i]} | ${L_US_RATIOS[$i]} |"
    done
    echo
    echo "Against tonic's generated no-op (Envoy's whole request decoded, a \`CheckResponse\` built per" \
         "Check), $PAIRS more pairs: median CPU µs/Check $S_BASE_US for it, $S_PA_US for phantom-authz."
    echo
    echo "h2load's CPU is its share of CPU $LOAD_CPU during the run; below 100 % it waited for the server." \
         "CPU µs/Check is the server's own user + system time over the run ÷ Checks: other work on the" \
         "machine delays the server (req/s) far more than it changes that cost."
    echo
    echo "## p99 at $HALF req/s (loadgen, ms; load $H_LOAD)"
    echo
    echo "| pair | no-op p99 | phantom-authz p99 | difference |"
    echo "| ---: | ---: | ---: | ---: |"
    for i in "${!H_BASE[@]}"; do echo "| $((i + 1)) | ${H_BASE[$i]} | ${H_PA[$i]} | ${H_DELTAS[$i]} |"; done
    echo
    echo "loadgen's CPU over these runs: $(spread "${H_CPU[@]}") %."
    echo
    echo "## Miss, one in flight (p50 ms; load $M_LOAD)"
    echo
    echo "| pair | IdP alone (curl, kept-alive) | phantom-authz miss (loadgen) | difference |"
    echo "| ---: | ---: | ---: | ---: |"
    for i in "${!M_IDP[@]}"; do echo "| $((i + 1)) | ${M_IDP[$i]} | ${M_PA[$i]} | ${M_DELTAS[$i]} |"; done
    echo
    echo "At saturation (64 in flight, a new token each): $(calc "$(get miss_sat rps)" 0) req/s," \
         "p99 $(calc "$(get miss_sat p99_ms)" 3) ms. Miss runs: $MISS_CALLS introspection calls," \
         "$MISS_CONNS new TCP connections accepted by the IdP."
    echo
    echo "## Redis hit vs. no-op (req/s; load $R_LOAD)"
    echo
    echo "| pair | no-op req/s | h2load CPU | no-op CPU µs/Check | Redis hit req/s | h2load CPU | phantom-authz + redis-server CPU µs/Check | req/s ratio | CPU ratio |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for i in "${!R_BASE[@]}"; do
        echo "| $((i + 1)) | ${R_BASE[$i]} | ${R_BASE_CPU[$i]} % | ${R_BASE_US[$i]} | ${R_PA[$i]} | ${R_PA_CPU[$i]} % |" \
             "${R_PA_US[$i]} | ${R_RATIOS[$i]} | ${R_US_RATIOS[$i]} |"
    done
    echo
    echo "Redis counted $R_GETS GETs over these $R_CHECKS Redis-hit Checks; phantom-authz counted" \
         "$R_HITS Redis hits, $R_MISSES misses and $R_ERRORS errors. Against tonic's generated" \
         "no-op, $PAIRS more pairs: median CPU µs/Check $RS_BASE_US for it, $RS_PA_US for phantom-authz" \
         "and redis-server."
    echo
    echo "## Memory"
    echo
    echo "VmRSS $RSS0 KiB before, $RSS1 KiB after caching $CACHED tokens" \
         "(Redis off, \`--local-cache-max-entries 200000\`): $BYTES_PER bytes per cached token."
} >"$OUT.new"
if [ -f "$OUT" ] && grep -q '^## Findings' "$OUT"; then
    # Keep the hand-written findings below the generated part.
    { echo; sed -n '/^## Findings/,$p' "$OUT"; } >>"$OUT.new"
fi
mv "$OUT.new" "$OUT"
cat "$OUT"
