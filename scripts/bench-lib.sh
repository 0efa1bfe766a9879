# bench-lib.sh: what the benchmark scripts share, sourced by scripts/bench.sh and
# scripts/bench-http.sh: tools, process handling, CPU pinning and priority, h2load runs with
# h2load's own CPU, and alternating pairs reduced to a median ratio.
#
# The sourcing script sets BENCH_SCRIPT (its name, for messages) and may set SERVER_CPU and
# LOAD_CPU before sourcing. Every process started through this file is killed on exit.

SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PAIRS=${BENCH_PAIRS:-5}

log() { printf '== %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "${BENCH_SCRIPT:-bench}" "$*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------
apt_updated=
need() { # need COMMAND DEBIAN_PACKAGE
    command -v "$1" >/dev/null 2>&1 && return
    log "installing $2 (for $1)"
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}
need h2load nghttp2-client
need taskset util-linux
need lscpu util-linux
need ss iproute2
need curl curl
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs (servers on CPU $SERVER_CPU, load on CPU $LOAD_CPU)"

# As root, the benchmark's processes run at raised priority so that a build or other work on
# the machine distorts the figures less (BENCH_NICE=0 turns this off).
PRIO=()
AUTOGROUP_NICE=
if [ "$(id -u)" = 0 ] && [ "${BENCH_NICE:--10}" != 0 ]; then
    PRIO=(nice -n "${BENCH_NICE:--10}")
    # With autogroup scheduling, nice only ranks processes within one session; raise this
    # session's group too (restored on exit) so other sessions' builds yield to the benchmark.
    if [ -w /proc/self/autogroup ]; then
        AUTOGROUP_NICE=$(awk '{ print $NF }' /proc/self/autogroup)
        echo "${BENCH_NICE:--10}" 2>/dev/null >/proc/self/autogroup || AUTOGROUP_NICE=
    fi
fi

# --- process handling ----------------------------------------------------------------------
# Binaries are built with the `production` profile, as the container image ships them. BENCH_BIN
# names a directory of binaries already built (a copy of target/production, to compare builds):
# then nothing is built.
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-target}/production}
build() { # build CARGO_BUILD_ARGS...: production binaries, unless BENCH_BIN is set
    [ -n "${BENCH_BIN:-}" ] && return
    log "building production binaries (whole-program LTO: a few minutes)"
    cargo build --locked --profile production "$@"
}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
    if [ -n "$AUTOGROUP_NICE" ]; then echo "$AUTOGROUP_NICE" >/proc/self/autogroup || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX: waits up to 20 s for a line matching REGEX, prints the first match.
wait_for() {
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
        ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
    done
}

stop() { # stop PID: ends one process started here
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# start_example NAME ARGS...: starts an example on the server CPU, sets ADDR and PID.
start_example() {
    local name=$1; shift
    "${PRIO[@]}" taskset -c "$SERVER_CPU" "$BIN/examples/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PID=$!; PIDS+=("$PID")
    ADDR=$(wait_for "$WORK/$name.out" '^listening ' | cut -d' ' -f2)
}

# start_phantom ARGS...: starts phantom-authz on the server CPU against the IdP at $IDP, sets
# PA_GRPC, PA_ADMIN, PA_HTTP (with --http-listen) and PA_PID.
start_phantom() {
    local err="$WORK/phantom-authz.$RANDOM.err" line
    NO_COLOR=1 RUST_LOG=warn,phantom_authz=info "${PRIO[@]}" taskset -c "$SERVER_CPU" "$BIN/phantom-authz" \
        --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --introspection-url "http://$IDP/oauth/v2/oauth-introspect" \
        --client-id bench --client-secret bench-secret "$@" 2>"$err" &
    PA_PID=$!; PIDS+=("$PA_PID")
    line=$(wait_for "$err" 'phantom-authz listening')
    PA_GRPC=$(grep -oE 'grpc=[0-9.:]+' <<<"$line" | cut -d= -f2)
    PA_ADMIN=$(grep -oE 'admin=[0-9.:]+' <<<"$line" | cut -d= -f2)
    PA_HTTP=$(grep -oE 'http=[0-9.:]+' "$err" | head -1 | cut -d= -f2 || true)
    [ -n "$PA_GRPC" ] && [ -n "$PA_ADMIN" ] || die "cannot parse addresses from: $line"
}

calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# --- measuring -------------------------------------------------------------------------------

# timed NAME COMMAND...: runs COMMAND on the load CPU, its stdout in $WORK/NAME.out; prints the
# CPU it used as a percentage of its wall time (100 = the whole load CPU: then the generator,
# not the server, may be the limit).
timed() {
    local name=$1 times; shift
    times=$( { TIMEFORMAT='%U %S %R'; time "${PRIO[@]}" taskset -c "$LOAD_CPU" "$@" >"$WORK/$name.out"; } 2>&1 )
    awk -v t="$times" 'BEGIN { split(t, a, " "); printf "%.0f\n", 100 * (a[1] + a[2]) / a[3] }'
}

# cpu_ticks PID[,PID...]: user + system CPU time the processes have used so far, in clock ticks.
cpu_ticks() {
    local pid total=0
    for pid in ${1//,/ }; do total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat"))); done
    echo "$total"
}

# h2load_run NAME SERVER_PID[,PID...] ARGS...: one h2load run; prints "req/s cpu% server-µs"
# (the server's own CPU time, user and kernel, per request, summed over the PIDs given: unlike
# req/s, hardly moved by other work on the machine) and keeps h2load's output in $WORK/NAME.out. Any failed or errored request
# fails the benchmark.
h2load_run() {
    local name=$1 pid=$2 cpu rps ticks0 ticks1 requests; shift 2
    ticks0=$(cpu_ticks "$pid")
    cpu=$(timed "$name" h2load "$@")
    ticks1=$(cpu_ticks "$pid")
    grep -qE " 0 failed, 0 errored" "$WORK/$name.out" || die "h2load saw errors: $(cat "$WORK/$name.out")"
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$WORK/$name.out")
    [ -n "$rps" ] || die "no rate in h2load's output: $(cat "$WORK/$name.out")"
    requests=$(sed -n 's/^requests: \([0-9]*\) total.*/\1/p' "$WORK/$name.out")
    printf '%.0f %s %s\n' "$rps" "$cpu" \
        "$(calc "($ticks1 - $ticks0) * 1000000 / $(getconf CLK_TCK) / $requests" 2)"
}

# alternate BASE_FN SUBJECT_FN: PAIRS pairs of runs, the order flipping each pair so that
# drifting background load moves both sides alike. Each function prints "value cpu%", and may
# add the server's CPU µs per request. Sets BASE_V, BASE_CPU, SUBJ_V, SUBJ_CPU (arrays, one
# entry a pair), RATIOS (subject ÷ base) and, with CPU figures, BASE_US, SUBJ_US and US_RATIOS
# (base ÷ subject: the throughput ratio the CPU time alone predicts).
alternate() {
    local pair b bc bu s sc su
    BASE_V=(); BASE_CPU=(); SUBJ_V=(); SUBJ_CPU=(); RATIOS=(); BASE_US=(); SUBJ_US=(); US_RATIOS=()
    for pair in $(seq "$PAIRS"); do
        if [ $((pair % 2)) -eq 1 ]; then
            read -r b bc bu < <("$1"); read -r s sc su < <("$2")
        else
            read -r s sc su < <("$2"); read -r b bc bu < <("$1")
        fi
        [ -n "$b" ] && [ -n "$s" ] || die "pair $pair: a run failed"
        BASE_V+=("$b"); BASE_CPU+=("$bc"); SUBJ_V+=("$s"); SUBJ_CPU+=("$sc")
        RATIOS+=("$(calc "$s / $b" 3)")
        if [ -n "$bu" ] && [ -n "$su" ]; then
            BASE_US+=("$bu"); SUBJ_US+=("$su"); US_RATIOS+=("$(calc "$bu / $su" 3)")
        fi
        log "pair $pair: $1 $b (load CPU $bc %, server ${bu:-?} µs), $2 $s (load CPU $sc %, server ${su:-?} µs)," \
            "ratio ${RATIOS[-1]} (load $(loadavg))"
    done
}

# median VALUES...: the median (the lower middle one for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
# spread VALUES...: "min–max".
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s–%s", lo, hi }'; }
