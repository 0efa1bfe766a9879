#!/usr/bin/env bash
# profile.sh: instructions per local-hit Check, phantom-authz vs. the no-op answering the same
# Authorization bytes and reading the request as phantom-authz does (`--lean`), counted by callgrind (repeatable whatever else the machine runs).
#
# Each server runs under `valgrind --tool=callgrind` and gets PROFILE_SMALL, then (in a fresh
# process) PROFILE_LARGE Checks from h2load (8 connections × 16 streams, the hot token's
# pre-encoded CheckRequest); counters are dumped once h2load is done, before the connections
# close. Start-up cancels out of (large − small) ÷ (large − small Checks). Prints instructions
# per Check for both servers, and the functions whose own (self) instructions per Check exceed
# the no-op's most. Keeps the callgrind files in PROFILE_DIR (default: a temporary directory).
#
#   scripts/profile.sh
#   PROFILE_SMALL=2000 PROFILE_LARGE=12000 PROFILE_TOP=40 scripts/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_SCRIPT=profile.sh
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
SMALL=${PROFILE_SMALL:-2000}
LARGE=${PROFILE_LARGE:-10000}
TOP=${PROFILE_TOP:-30}
OUT_DIR=${PROFILE_DIR:-$WORK}
mkdir -p "$OUT_DIR"
need valgrind valgrind
need python3 python3

build --bin phantom-authz --example scripted_idp --example noop_authz --example loadgen

start_example scripted_idp --listen 127.0.0.1:0 --jwt-bytes 1000 --max-age 300
IDP=$ADDR
"$BIN/examples/loadgen" --write-check "$WORK/check.bin" --token hot-token
start_phantom
"$BIN/phantom-authz" check --target "$PA_GRPC" --token hot-token --show-jwt --json |
    sed -n 's/.*"authorization": *"\([^"]*\)".*/\1/p' >"$WORK/authorization"
[ -s "$WORK/authorization" ] || die "phantom-authz did not allow the hot token"
stop "$PA_PID"

# counted NAME CHECKS COMMAND...: runs COMMAND (phantom-authz, or an example printing
# "listening ADDR") under callgrind, sends CHECKS Checks, dumps the counters to $OUT_DIR/NAME.CHECKS.
counted() {
    local name=$1 checks=$2 err="$WORK/$1.$2.err" pid addr; shift 2
    rm -f "$OUT_DIR/$name.$checks"*
    NO_COLOR=1 RUST_LOG=warn,phantom_authz=info valgrind --tool=callgrind --dump-instr=no \
        --callgrind-out-file="$OUT_DIR/$name.$checks" "$@" >"$WORK/$name.$checks.out" 2>"$err" &
    pid=$!; PIDS+=("$pid")
    if [ "$name" = phantom ]; then
        addr=$(wait_for "$err" 'phantom-authz listening' | grep -oE 'grpc=[0-9.:]+' | cut -d= -f2)
    else
        addr=$(wait_for "$WORK/$name.$checks.out" '^listening ' | cut -d' ' -f2)
    fi
    h2load -n "$checks" -c 8 -m 16 -d "$WORK/check.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://$addr/envoy.service.auth.v3.Authorization/Check" >"$WORK/h2load.out"
    grep -qE " 0 failed, 0 errored" "$WORK/h2load.out" || die "h2load saw errors: $(cat "$WORK/h2load.out")"
    callgrind_control -d "$pid" >/dev/null
    stop "$pid"
}
for checks in "$SMALL" "$LARGE"; do
    log "no-op, $checks Checks"
    counted noop "$checks" "$BIN/examples/noop_authz" --listen 127.0.0.1:0 --authorization-file "$WORK/authorization" --lean
    log "phantom-authz, $checks Checks"
    counted phantom "$checks" "$BIN/phantom-authz" --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --introspection-url "http://$IDP/oauth/v2/oauth-introspect" --client-id bench --client-secret bench-secret
done

python3 - "$OUT_DIR" "$SMALL" "$LARGE" "$TOP" <<'PY'
import collections, glob, re, subprocess, sys
out_dir, small, large, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def self_costs(name, checks):
    """Self instructions per function, summed over every dump and thread of one run."""
    costs = collections.Counter()
    for path in glob.glob(f"{out_dir}/{name}.{checks}*"):
        text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100",
                               "--show-percs=no", path], capture_output=True, text=True).stdout
        for line in text.splitlines():
            m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$", line)
            if not m or ":" not in m.group(2):
                continue
            function = m.group(2).split(":", 1)[1].split(" [")[0].strip()
            costs[function] += int(m.group(1).replace(",", ""))
    return costs

per_check = {}
for name in ("noop", "phantom"):
    lo, hi = self_costs(name, small), self_costs(name, large)
    per_check[name] = {f: (hi[f] - lo[f]) / (large - small) for f in set(lo) | set(hi)}
    print(f"{name}: {sum(per_check[name].values()):,.0f} instructions per Check")
noop, phantom = per_check["noop"], per_check["phantom"]
print(f"difference: {sum(phantom.values()) - sum(noop.values()):,.0f} instructions per Check")
print()
print(f"top {top} functions by self instructions per Check above the no-op's:")
print(f"{'phantom':>9} {'no-op':>9} {'extra':>9}  function")
extra = sorted(set(noop) | set(phantom), key=lambda f: noop.get(f, 0) - phantom.get(f, 0))
for f in extra[:top]:
    p, n = phantom.get(f, 0), noop.get(f, 0)
    print(f"{p:9.0f} {n:9.0f} {p - n:9.0f}  {f[:140]}")
PY
