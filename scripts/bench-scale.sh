#!/usr/bin/env bash
# bench-scale.sh: does a Check cost the same with a million live tokens as with a thousand, and
# what does each cached token take in memory? Writes bench/scale-results.md.
#
# One phantom-authz (Redis configured, in-process tier on for an hour) is filled through its own
# path with BENCH_TOKENS distinct tokens (default 1,000,000): each one introspected once at the
# scripted IdP, sealed into Redis and kept in process. Then, in BENCH_PAIRS alternating rounds
# (default 3), the load generator draws tokens uniformly from the first 1k, 100k and all of
# them; each figure is a ratio to the 1k run of the same round, and the median is reported.
# A second phantom-authz with --local-cache-ttl 0 does the same over the Redis entries.
#
# Distinct tokens need a body per request, which h2load cannot vary, so the rows are driven by
# examples/loadgen.rs; h2load (nghttp2-client) drives one reference pair on a single token to
# show how close loadgen comes to the server's limit. Servers (redis-server, IdP, phantom-authz)
# are pinned to CPU 0 and the load to CPU 1. --redis-timeout is raised to 1 s: on a busy shared
# machine a stall past the 50 ms default turns a Redis hit into an introspection, and the runs
# measure hits. Besides req/s, each row gives the server's own CPU time per Check (from
# /proc/PID/stat), which does not depend on who limits the rate.
#
#   scripts/bench-scale.sh                        # ~8 minutes after the build
#   BENCH_TOKENS=200000 BENCH_PAIRS=1 scripts/bench-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${BENCH_TOKENS:-1000000}
PAIRS=${BENCH_PAIRS:-3}
DURATION=${BENCH_DURATION:-8s}
JWT_BYTES=1000
SERVER_CPU=0
LOAD_CPU=1
RUN=7
OUT=bench/scale-results.md

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench-scale.sh: %s\n' "$*" >&2; exit 1; }
need() { # need COMMAND DEBIAN_PACKAGE
    command -v "$1" >/dev/null 2>&1 && return
    log "installing $2 (for $1)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}
need redis-server redis-server
need redis-cli redis-tools
need h2load nghttp2-client
need taskset util-linux
need curl curl
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs"
[ "$TOKENS" -ge 100000 ] || die "BENCH_TOKENS must be at least 100000"

cargo build --locked --release --bin phantom-authz --example scripted_idp --example loadgen
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
trap 'exit 130' INT TERM
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
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 30000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
metric() { curl -sf "http://$PA_ADMIN/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
idp_calls() { curl -sf "http://$IDP/stats" | awk '$1 == "calls" { print $2 }'; }
redis_memory() { redis-cli -p "$REDIS_PORT" info memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'; }
redis_keys() { redis-cli -p "$REDIS_PORT" dbsize | tr -d '\r'; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
TICK=$(getconf CLK_TCK)

start_phantom() { # start_phantom ARGS...: sets PA_GRPC, PA_ADMIN, PA_PID
    local err="$WORK/phantom-authz.$RANDOM.err" line
    NO_COLOR=1 RUST_LOG=warn,phantom_authz=info taskset -c "$SERVER_CPU" "$BIN/phantom-authz" \
        --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --introspection-url "http://$IDP/oauth/v2/oauth-introspect" \
        --client-id bench --client-secret bench-secret \
        --redis-url "redis://127.0.0.1:$REDIS_PORT" --cache-secret-file "$WORK/cache-secret" \
        --max-cache-ttl 1h --redis-timeout 1s "$@" 2>"$err" &
    PA_PID=$!; PIDS+=("$PA_PID")
    line=$(wait_for "$err" 'phantom-authz listening')
    PA_GRPC=$(grep -oE 'grpc=[0-9.:]+' <<<"$line" | cut -d= -f2)
    PA_ADMIN=$(grep -oE 'admin=[0-9.:]+' <<<"$line" | cut -d= -f2)
}

# measure NAME POOL: one loadgen run drawing uniformly from the first POOL tokens; prints
# "req/s server-µs-per-Check loadgen-CPU%" and fails on any denial, error or IdP call.
measure() {
    local calls0 ticks0 ticks1 times json requests rps
    calls0=$(idp_calls); ticks0=$(cpu_ticks "$PA_PID")
    times=$( { TIMEFORMAT='%U %S %R'; time taskset -c "$LOAD_CPU" "$BIN/examples/loadgen" \
        --target "http://$PA_GRPC" --tokens uniform --pool "$2" --run "$RUN" --warmup 0s \
        --duration "$DURATION" --json >"$WORK/$1.json"; } 2>&1 )
    ticks1=$(cpu_ticks "$PA_PID")
    json=$(cat "$WORK/$1.json")
    grep -q '"denied":0,"errors":0' <<<"$json" || die "$1: not all allowed: $json"
    [ "$(idp_calls)" = "$calls0" ] || die "$1: a token was introspected again (not a cache hit)"
    requests=$(grep -oE '"requests":[0-9]+' <<<"$json" | cut -d: -f2)
    rps=$(grep -oE '"rps":[0-9.]+' <<<"$json" | cut -d: -f2)
    awk -v rps="$rps" -v n="$requests" -v t="$times" -v d="$((ticks1 - ticks0))" -v hz="$TICK" \
        'BEGIN { split(t, a, " "); printf "%.0f %.1f %.0f\n", rps, 1e6 * d / hz / n, 100 * (a[1] + a[2]) / a[3] }'
}

# rounds PREFIX: BENCH_PAIRS rounds over 1k, 100k and TOKENS, the order reversed every other
# round; appends table rows to $PREFIX.rows and ratios to $PREFIX.<pool>.
rounds() {
    local prefix=$1 round pool pools rps us cpu base base_us
    for round in $(seq "$PAIRS"); do
        if [ $((round % 2)) -eq 1 ]; then pools="1000 100000 $TOKENS"; else pools="$TOKENS 100000 1000"; fi
        declare -A r=()
        for pool in $pools; do
            read -r rps us cpu < <(measure "$prefix-$round-$pool" "$pool")
            r[$pool]="$rps $us $cpu"
            log "$prefix round $round, $pool tokens: $rps req/s, $us µs server CPU per Check, loadgen CPU $cpu %"
        done
        read -r base base_us _ <<<"${r[1000]}"
        for pool in 1000 100000 "$TOKENS"; do
            read -r rps us cpu <<<"${r[$pool]}"
            calc "$rps / $base" 3 >>"$WORK/$prefix.$pool"; echo >>"$WORK/$prefix.$pool"
            calc "$base_us / $us" 3 >>"$WORK/$prefix.core.$pool"; echo >>"$WORK/$prefix.core.$pool"
            echo "| $round | $pool | $rps | $(calc "$rps / $base" 3) | $us | $(calc "$base_us / $us" 3) | $cpu % |" >>"$WORK/$prefix.rows"
        done
        unset r
    done
}

REDIS_PORT=$(free_port)
taskset -c "$SERVER_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
    --appendonly no --daemonize no >"$WORK/redis.out" 2>&1 &
PIDS+=("$!")
wait_for "$WORK/redis.out" 'Ready to accept connections' >/dev/null
head -c 32 /dev/urandom | base64 >"$WORK/cache-secret"
taskset -c "$SERVER_CPU" "$BIN/examples/scripted_idp" --listen 127.0.0.1:0 --jwt-bytes "$JWT_BYTES" \
    --max-age 3600 >"$WORK/idp.out" 2>&1 &
PIDS+=("$!")
IDP=$(wait_for "$WORK/idp.out" '^listening ' | cut -d' ' -f2)
LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# --- fill: every token introspected once, through the service's own path ---------------------
ENTRIES=$((TOKENS + TOKENS / 4))
start_phantom --local-cache-ttl 1h --local-cache-max-entries "$ENTRIES" --local-cache-max-bytes 8GiB
fill() { # fill N: the first N tokens in turn, each introspected once; on a loaded machine an
    # introspection may time out (a 503), so passes repeat, hits for the tokens already cached,
    # until one pass is all allowed.
    local pass
    for pass in 1 2 3; do
        taskset -c "$LOAD_CPU" "$BIN/examples/loadgen" --target "http://$PA_GRPC" --tokens same \
            --pool "$1" --requests "$1" --run "$RUN" --concurrency 128 --warmup 0s --duration 30m \
            --json >"$WORK/fill-$1.json"
        grep -q '"denied":0,"errors":0' "$WORK/fill-$1.json" && return
        log "fill $1, pass $pass: $(cat "$WORK/fill-$1.json")"
    done
    die "fill $1 still denied after $pass passes"
}
fill 1000
# The 1k run grows connection buffers and allocator arenas before the memory baseline.
measure warm 1000 >/dev/null
RSS0=$(rss_kib "$PA_PID"); ENTRIES0=$(metric phantom_authz_local_cache_entries)
REDIS_MEM0=$(redis_memory); KEYS0=$(redis_keys)
log "filling $TOKENS tokens"
FILL_START=$(date +%s.%N)
fill "$TOKENS"
FILL_SECS=$(calc "$(date +%s.%N) - $FILL_START" 1)
RSS1=$(rss_kib "$PA_PID"); ENTRIES1=$(metric phantom_authz_local_cache_entries)
REDIS_MEM1=$(redis_memory); KEYS1=$(redis_keys)
CACHED=$(( ${ENTRIES1%.*} - ${ENTRIES0%.*} ))
[ "${ENTRIES1%.*}" -eq "$TOKENS" ] || die "$ENTRIES1 entries in process after filling $TOKENS"
[ "$((KEYS1 - KEYS0))" -eq "$CACHED" ] || die "$((KEYS1 - KEYS0)) Redis keys for $CACHED tokens"
IDP_CALLS=$(idp_calls)
[ "$IDP_CALLS" -ge "$TOKENS" ] || die "$IDP_CALLS introspections for $TOKENS tokens"
PER_TOKEN=$(calc "($RSS1 - $RSS0) * 1024 / $CACHED" 0)
REDIS_PER_TOKEN=$(calc "($REDIS_MEM1 - $REDIS_MEM0) / ($KEYS1 - $KEYS0)" 0)
"$BIN/phantom-authz" check --target "$PA_GRPC" --token "same-$RUN-0" --show-jwt --json \
    >"$WORK/check.json"
JWT_LEN=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["headers"]["authorization"]) - 7)' "$WORK/check.json")
log "filled in $FILL_SECS s; in process $PER_TOKEN B per token, Redis $REDIS_PER_TOKEN B per key (JWT $JWT_LEN B)"

# --- local hits ------------------------------------------------------------------------------
rounds local
# One token, h2load against loadgen: how much of the server's rate loadgen reaches.
"$BIN/examples/loadgen" --tokens same --run "$RUN" --write-request "$WORK/check.bin"
H2LOAD=$( { TIMEFORMAT='%U %S %R'; time taskset -c "$LOAD_CPU" h2load -n 200000 -c 4 -m 16 \
    -d "$WORK/check.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$PA_GRPC/envoy.service.auth.v3.Authorization/Check" >"$WORK/h2load.out"; } 2>&1 )
grep -q " 0 failed, 0 errored" "$WORK/h2load.out" || die "h2load saw errors: $(cat "$WORK/h2load.out")"
H2LOAD_RPS=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$WORK/h2load.out")
H2LOAD_CPU=$(awk -v t="$H2LOAD" 'BEGIN { split(t, a, " "); printf "%.0f", 100 * (a[1] + a[2]) / a[3] }')
read -r ONE_RPS ONE_US ONE_CPU < <(measure one 1)
log "one token: h2load $H2LOAD_RPS req/s (CPU $H2LOAD_CPU %), loadgen $ONE_RPS req/s (CPU $ONE_CPU %)"
kill "$PA_PID"; wait "$PA_PID" 2>/dev/null || true

# --- Redis hits ------------------------------------------------------------------------------
start_phantom --local-cache-ttl 0
rounds redis

LOADAVG_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**missed**"; fi; }
LOCAL_MEDIAN=$(median <"$WORK/local.$TOKENS")
LOCAL_100K=$(median <"$WORK/local.100000")
REDIS_MEDIAN=$(median <"$WORK/redis.$TOKENS")
REDIS_100K=$(median <"$WORK/redis.100000")
LOCAL_CORE=$(median <"$WORK/local.core.$TOKENS")
LOCAL_CORE_100K=$(median <"$WORK/local.core.100000")
REDIS_CORE=$(median <"$WORK/redis.core.$TOKENS")
REDIS_CORE_100K=$(median <"$WORK/redis.core.100000")
mkdir -p bench
{
    echo "# A million tokens: throughput and memory at scale"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') by \`scripts/bench-scale.sh\` on $(nproc) vCPUs" \
         "($(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), a shared machine: other work" \
         "ran alongside, so absolute figures are noisy; ratios are taken within one round)."
    echo "Load average (1/5/15 min) before: $LOADAVG_BEFORE; after: $LOADAVG_AFTER."
    echo
    echo "## Method"
    echo
    echo "- redis-server, the scripted IdP (\`examples/scripted_idp.rs\`, JWTs of $JWT_LEN bytes carrying"
    echo "  \`sub\` and \`exp\`) and phantom-authz pinned to CPU $SERVER_CPU; the load generator to CPU $LOAD_CPU."
    echo "- Fill: $TOKENS distinct tokens sent once each through phantom-authz (Redis configured,"
    echo "  \`--local-cache-ttl 1h --local-cache-max-entries $ENTRIES\`): each introspected once, sealed into"
    echo "  Redis and kept in process, in $FILL_SECS s ($IDP_CALLS introspections: a pass repeats for any"
    echo "  introspection timed out on the loaded machine). Every measured run then checks that the IdP"
    echo "  saw no further call and that every Check was allowed."
    echo "- Throughput: \`examples/loadgen.rs --tokens uniform\` (4 HTTP/2 connections, 64 in flight, $DURATION"
    echo "  a run) draws each Check's token uniformly from the first 1k, 100k or all $TOKENS tokens;"
    echo "  $PAIRS rounds, the order of the three runs reversed every other round. Ratios are to the 1k run"
    echo "  of the same round. Server CPU per Check is phantom-authz's user + system time over the run"
    echo "  (\`/proc/PID/stat\`) divided by the Checks answered: it holds whoever limits the rate, and"
    echo "  its ratio (1k ÷ N) is the throughput per core. Other work on this machine starves the"
    echo "  pinned server at times, even within a round, so req/s ratios swing; per-core ratios less."
    echo "- phantom-authz runs with \`--redis-timeout 1s\`: a stall past the 50 ms default on the busy"
    echo "  machine would turn a Redis hit into an introspection."
    echo "- Generator check, one token, local hit: h2load (4 connections × 16 streams, a pre-encoded"
    echo "  CheckRequest) reached $H2LOAD_RPS req/s using $H2LOAD_CPU % of CPU $LOAD_CPU; loadgen reached $ONE_RPS req/s"
    echo "  using $ONE_CPU % ($ONE_US µs server CPU per Check). Where loadgen's CPU is near 100 %, it is the"
    echo "  limit and req/s understates the server; the CPU-per-Check column is the server's own cost."
    echo "- Memory: phantom-authz VmRSS before and after the fill ($RSS0 → $RSS1 KiB for $CACHED entries);"
    echo "  Redis \`INFO memory\` used_memory before and after ($REDIS_MEM0 → $REDIS_MEM1 B for $((KEYS1 - KEYS0)) keys)."
    echo
    echo "## Figures"
    echo
    echo "| figure | measured | goal |"
    echo "| --- | --- | --- |"
    echo "| local-hit throughput per core, $TOKENS tokens ÷ 1k (median; server CPU per Check at 1k ÷ at $TOKENS) | $LOCAL_CORE (100k: $LOCAL_CORE_100K) | ≥ 0.9: $(verdict "$LOCAL_CORE >= 0.9") |"
    echo "| local-hit req/s, $TOKENS tokens ÷ 1k (median; moved by other work on the machine) | $LOCAL_MEDIAN (100k: $LOCAL_100K) | ≥ 0.9: $(verdict "$LOCAL_MEDIAN >= 0.9") |"
    echo "| Redis-hit throughput per core, $TOKENS keys ÷ 1k (median; phantom-authz's CPU only) | $REDIS_CORE (100k: $REDIS_CORE_100K) | ≥ 0.9: $(verdict "$REDIS_CORE >= 0.9") |"
    echo "| Redis-hit req/s, $TOKENS keys ÷ 1k (median; moved by other work on the machine) | $REDIS_MEDIAN (100k: $REDIS_100K) | ≥ 0.9: $(verdict "$REDIS_MEDIAN >= 0.9") |"
    echo "| in-process memory per cached token (JWT $JWT_LEN B) | $PER_TOKEN B | ≤ JWT + 256 = $((JWT_LEN + 256)) B: $(verdict "$PER_TOKEN <= $JWT_LEN + 256") |"
    echo "| Redis used_memory per key | $REDIS_PER_TOKEN B | reported |"
    echo
    echo "### Local hits (Redis configured, in-process tier on)"
    echo
    echo "| round | tokens | req/s | ÷ 1k | server CPU µs per Check | per core ÷ 1k | loadgen CPU |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    cat "$WORK/local.rows"
    echo
    echo "### Redis hits (\`--local-cache-ttl 0\`)"
    echo
    echo "| round | tokens | req/s | ÷ 1k | server CPU µs per Check | per core ÷ 1k | loadgen CPU |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    cat "$WORK/redis.rows"
} >"$OUT"
log "local $LOCAL_MEDIAN, Redis $REDIS_MEDIAN, $PER_TOKEN B per token in process, $REDIS_PER_TOKEN B per Redis key; written to $OUT"
