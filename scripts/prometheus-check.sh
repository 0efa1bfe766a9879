#!/usr/bin/env bash
# End-to-end check of the operations kit against a real Prometheus.
#
# Starts, all on 127.0.0.1: a redis-server, the scripted IdP (examples/scripted_idp.rs),
# phantom-authz with Redis, and Prometheus scraping phantom-authz every second with
# grafana/alerts.yml as its rule file. Drives mixed load (valid, inactive, missing-token and
# IdP-unavailable requests, plus a short Redis outage and a short IdP outage so the Redis
# error and circuit breaker series exist, as they would in production), then:
#
#   - promtool check rules / check config, and promtool check metrics on /metrics;
#   - evaluates every PromQL expression of grafana/phantom-authz.json through
#     /api/v1/query and requires every panel to return data (unless allowlisted below);
#   - evaluates every alerting rule expression the same way and requires Prometheus to have
#     loaded and evaluated every rule without error.
#
# Prints one PASS/FAIL line per expression and exits non-zero on any failure.
# Usage: scripts/prometheus-check.sh        (KEEP_WORKDIR=1 keeps logs in the temp dir)
# Needs: cargo, python3, curl; installs prometheus and redis-server with apt-get if missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# Overridable to check another copy (for example a dashboard edited in Grafana and exported).
DASHBOARD=$(realpath "${DASHBOARD:-$ROOT/grafana/phantom-authz.json}")
RULES=$(realpath "${RULES:-$ROOT/grafana/alerts.yml}")
# Bound on everything after the build (processes, load, scrapes, queries).
RUN_LIMIT_SECONDS=150

# Metrics the dashboard already shows but the service does not export yet. A panel whose
# every expression names one of these may return no data; any other empty panel fails.
# Each entry says why; drop it once the load below makes the metric appear.
ALLOW_EMPTY_METRICS=(
  # Token evictions (admin API / Redis pub-sub): this load evicts nothing, and the counter
  # only exists after the first eviction.
  phantom_authz_evictions_total
)

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

# A flag or variable set by the caller must not change what is tested, and no request may
# leave 127.0.0.1 through a proxy.
while IFS='=' read -r name _; do unset "$name"; done < <(env | grep '^PHANTOM_AUTHZ_' || true)
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy='*' NO_PROXY='*'

# --- tools ------------------------------------------------------------------------------------
SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
apt_install() {
  log "installing $* with apt-get"
  if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
  fi
}
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  apt_install prometheus
fi
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt_install redis-server
fi
for tool in cargo python3 curl; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

# --- static checks ----------------------------------------------------------------------------
log "promtool check rules"
rules_out=$(promtool check rules "$RULES") || { echo "$rules_out"; die "promtool check rules $RULES"; }
echo "$rules_out"
RULE_COUNT=$(sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p' <<<"$rules_out")
[[ -n $RULE_COUNT && $RULE_COUNT -gt 0 ]] || die "no rules found in $RULES"

log "cargo build --bin phantom-authz --examples"
cargo build --quiet --bin phantom-authz --examples
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
AUTHZ=$TARGET_DIR/debug/phantom-authz
IDP=$TARGET_DIR/debug/examples/scripted_idp
LOADGEN=$TARGET_DIR/debug/examples/loadgen
for bin in "$AUTHZ" "$IDP" "$LOADGEN"; do
  [[ -x $bin ]] || die "$bin was not built"
done

# --- processes --------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/phantom-authz-promcheck.XXXXXX")
PIDS=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${PIDS[@]}"; do
    # The watchdog is a subshell: end its sleep too.
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP_WORKDIR:-} == 1 || $status -ne 0 ]]; then
    echo "logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "FAIL run time above ${RUN_LIMIT_SECONDS}s" >&2; exit 124' TERM

( sleep "$RUN_LIMIT_SECONDS"; kill -TERM $$ ) 2>/dev/null &
PIDS+=($!)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND every 0.1 s.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.1
  done
}

REDIS_PORT=$(free_port)
start_redis() {
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
    --dir "$WORK" --maxmemory 64mb --maxmemory-policy volatile-ttl >>"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_for 10 "redis-server on $REDIS_PORT" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
}
log "starting redis-server on 127.0.0.1:$REDIS_PORT"
start_redis

# start_idp ADDRESS: the scripted IdP; sets IDP_PID and IDP_ADDR.
start_idp() {
  : >"$WORK/idp.out"
  "$IDP" --listen "$1" --delay 5ms --jwt-bytes 1000 --max-age 300 --mode jwt \
    >"$WORK/idp.out" 2>>"$WORK/idp.err" &
  IDP_PID=$!
  PIDS+=("$IDP_PID")
  wait_for 10 "the scripted IdP" grep -q '^listening ' "$WORK/idp.out"
  IDP_ADDR=$(sed -n 's/^listening \(.*\)$/\1/p' "$WORK/idp.out" | head -n1)
}
start_idp 127.0.0.1:0
log "scripted IdP on $IDP_ADDR"

printf 'promcheck-client-secret\n' >"$WORK/client-secret"
head -c 32 /dev/urandom | base64 >"$WORK/cache-secret"
NO_COLOR=1 RUST_LOG=info "$AUTHZ" \
  --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --introspection-url "http://$IDP_ADDR/oauth/v2/oauth-introspect" \
  --client-id promcheck --client-secret-file "$WORK/client-secret" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" --cache-secret-file "$WORK/cache-secret" \
  2>"$WORK/phantom-authz.log" &
PIDS+=($!)
wait_for 20 "phantom-authz to listen" grep -q 'phantom-authz listening' "$WORK/phantom-authz.log"
listening=$(grep -m1 'phantom-authz listening' "$WORK/phantom-authz.log" | sed 's/\x1b\[[0-9;]*m//g')
GRPC_ADDR=$(sed -n 's/.*grpc=\([0-9.:]*\).*/\1/p' <<<"$listening")
ADMIN_ADDR=$(sed -n 's/.*admin=\([0-9.:]*\).*/\1/p' <<<"$listening")
[[ -n $GRPC_ADDR && -n $ADMIN_ADDR ]] || die "cannot parse addresses from: $listening"
log "phantom-authz grpc=$GRPC_ADDR admin=$ADMIN_ADDR"

PROM_PORT=$(free_port)
PROM="http://127.0.0.1:$PROM_PORT"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $RULES
scrape_configs:
  - job_name: phantom-authz
    static_configs:
      - targets: ["$ADMIN_ADDR"]
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null || die "promtool check config"
log "starting prometheus on 127.0.0.1:$PROM_PORT"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_for 30 "prometheus to be ready" curl -fsS "$PROM/-/ready"

# prom_true EXPR: succeeds when EXPR returns at least one series right now.
prom_true() {
  curl -fsS -G "$PROM/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}
# Prometheus applies new targets a few seconds after start; wait for the first scrape so the
# counters have samples from before the load.
wait_for 30 "the first scrape" prom_true 'up{job="phantom-authz"} == 1'

# --- load -------------------------------------------------------------------------------------
LOAD_RUN=0
run_load() {
  local tokens=$1 duration=$2 out
  LOAD_RUN=$((LOAD_RUN + 1))
  out=$WORK/loadgen-$LOAD_RUN-$tokens.out
  log "load: --tokens $tokens for $duration"
  timeout 30 "$LOADGEN" --target "http://$GRPC_ADDR" --connections 2 --concurrency 8 \
    --duration "$duration" --tokens "$tokens" --rate 200 >"$out" 2>&1 \
    || { tail -n 20 "$out" >&2; die "loadgen --tokens $tokens"; }
  tail -n 3 "$out" | sed 's/^/   loadgen: /' >&2
}
run_load mixed 8s
# A short Redis outage: unique tokens miss the local tier, so their Redis commands fail and
# the Redis error series and redis_up=0 appear, as in production.
log "stopping redis-server (outage)"
kill -TERM "$REDIS_PID"
wait "$REDIS_PID" 2>/dev/null || true
run_load unique 4s
curl -fsS "http://$ADMIN_ADDR/readyz" | sed 's/^/readyz during the outage: /' >&2
log "restarting redis-server"
start_redis
# A short IdP outage: unique tokens all need an introspection, the calls fail, the circuit
# breaker opens and rejects further calls.
log "stopping the scripted IdP (outage)"
kill -TERM "$IDP_PID"
wait "$IDP_PID" 2>/dev/null || true
run_load unique 3s
log "restarting the scripted IdP on $IDP_ADDR"
start_idp "$IDP_ADDR"
run_load mixed 5s
readyz=$(curl -fsS "http://$ADMIN_ADDR/readyz")
echo "readyz after recovery: $readyz" >&2
grep -q '"status":"ready"' <<<"$readyz" || die "/readyz is not ready: $readyz"

# --- metrics lint -----------------------------------------------------------------------------
log "promtool check metrics"
curl -fsS "http://$ADMIN_ADDR/metrics" >"$WORK/metrics.txt"
if promtool check metrics <"$WORK/metrics.txt" >"$WORK/metrics-lint.txt" 2>&1; then
  echo "PASS promtool check metrics"
  LINT_OK=1
else
  echo "FAIL promtool check metrics:"
  sed 's/^/  /' "$WORK/metrics-lint.txt"
  LINT_OK=0
fi

# Let Prometheus scrape the final state (two scrapes after the load) and evaluate the rules.
load_end=$(date +%s)
wait_for 20 "scrapes after the load" prom_true "timestamp(up{job=\"phantom-authz\"}) > $((load_end + 2))"

# --- PromQL -----------------------------------------------------------------------------------
log "evaluating dashboard and rule expressions"
set +e
python3 - "$PROM" "$DASHBOARD" "$RULE_COUNT" "$WORK/metrics.txt" "${ALLOW_EMPTY_METRICS[@]}" <<'PY'
import json
import re
import sys
import urllib.parse
import urllib.request

# Everything stays on 127.0.0.1: never go through a proxy from the environment.
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))

prom, dashboard_path, rule_count, metrics_path = sys.argv[1:5]
allow_empty = set(sys.argv[5:])
failures = 0

# Grafana variables -> values Prometheus can evaluate. A variable not listed here fails,
# so a new dashboard variable cannot slip past this check.
SUBST = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "instance": ".+",
    "job": ".+",
}


def substitute(expr):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in SUBST:
            raise ValueError(f"unknown dashboard variable ${name}")
        return SUBST[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def query(expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    data = body["data"]
    result = data["result"]
    if data["resultType"] in ("vector", "matrix"):
        return len(result)
    return 1  # scalar or string


def get(path):
    with urllib.request.urlopen(prom + path, timeout=10) as r:
        return json.load(r)["data"]


def fail(line):
    global failures
    failures += 1
    print(f"FAIL {line}")


dashboard = json.load(open(dashboard_path))
panels = []
stack = list(dashboard["panels"])
while stack:
    p = stack.pop(0)
    stack[:0] = p.get("panels", [])
    if p.get("type") != "row":
        panels.append(p)

exprs = panels_ok = panels_empty_ok = 0
for p in panels:
    title = p.get("title", "?")
    targets = [t for t in p.get("targets", []) if t.get("expr")]
    if not targets:
        fail(f'panel "{title}": no PromQL target')
        continue
    with_data = 0
    errors = 0
    for t in targets:
        exprs += 1
        label = f'panel "{title}" [{t.get("refId")}]'
        try:
            n = query(substitute(t["expr"]))
        except Exception as e:
            errors += 1
            fail(f"{label}: {e}\n     {t['expr']}")
            continue
        with_data += n > 0
        print(f"{'PASS' if n else 'EMPTY'} {label}: {n} series")
    if errors:
        continue
    if with_data:
        panels_ok += 1
        print(f'PASS panel "{title}": returns data')
        continue
    pending = sorted(m for m in allow_empty if all(m in t["expr"] for t in targets))
    if pending:
        panels_ok += 1
        panels_empty_ok += 1
        print(f'PASS panel "{title}": empty, allowed (metric not exported yet: {", ".join(pending)})')
    else:
        fail(f'panel "{title}": no target returned data')

# Allowlisted metrics that now exist: the allowlist entry should go.
exported = open(metrics_path).read()
for m in sorted(allow_empty):
    if re.search(rf"^{m}(\{{|\s)", exported, re.M):
        print(f"NOTE {m} is exported now: remove it from ALLOW_EMPTY_METRICS")

# Rules: as loaded by Prometheus, so this also proves the rule file was read.
rules = [r for g in get("/api/v1/rules")["groups"] for r in g["rules"]]
if len(rules) != int(rule_count):
    fail(f"prometheus loaded {len(rules)} rules, promtool found {rule_count}")
for r in rules:
    exprs += 1
    label = f'rule "{r["name"]}"'
    try:
        n = query(r["query"])
    except Exception as e:
        fail(f"{label}: {e}")
        continue
    if r.get("health") != "ok":
        fail(f"{label}: health {r.get('health')} {r.get('lastError', '')}")
        continue
    state = r.get("state", "")
    print(f"PASS {label}: evaluates ({n} series, {state or 'recording'})")

print(f"SUMMARY {exprs} expressions; {panels_ok}/{len(panels)} panels pass "
      f"({panels_empty_ok} empty by allowlist); {len(rules)} rules; {failures} failures")
sys.exit(1 if failures else 0)
PY
promql_status=$?
set -e

if [[ $promql_status -ne 0 || $LINT_OK -ne 1 ]]; then
  echo "prometheus-check: FAIL"
  exit 1
fi
echo "prometheus-check: PASS"
