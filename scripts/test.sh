#!/usr/bin/env bash
# Runs phantom-authz's whole test suite on a fresh Debian machine: installs what the tests need
# (redis-server, nginx, caddy, the Node.js OAuth server), then checks formatting and lints and runs every unit and
# integration test.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    local sudo="" policy=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # The packages would start system services (nginx on port 80): the tests start their own.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        # Removed however the install ends, so that no service start stays blocked.
        trap "$sudo rm -f /usr/sbin/policy-rc.d" EXIT
    fi
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    fi
    [ -z "$policy" ] || $sudo rm -f "$policy"
}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "==> installing redis-server"
    apt_install redis-server
    # The package may start a system instance; the tests start their own on free ports.
fi
# The Redis Cluster and Sentinel tests drive redis-cli (Debian's redis-tools); Sentinels are
# `redis-server --sentinel`.
if ! command -v redis-cli >/dev/null 2>&1; then
    echo "==> installing redis-tools"
    apt_install redis-tools
fi
# The forward-auth tests run real gateways, each on free loopback ports with its own config.
for gateway in nginx caddy; do
    if ! command -v "$gateway" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$gateway" ]; then
        echo "==> installing $gateway"
        apt_install "$gateway"
    fi
done
# The RS256 unit tests make their RSA key with openssl (ring cannot generate one).
if ! command -v openssl >/dev/null 2>&1; then
    echo "==> installing openssl"
    apt_install openssl
fi
export PATH="$PATH:/usr/sbin"
# The rfc7662 tests run a real OAuth server (npm oidc-provider) and verify JWTs with npm jose,
# both pinned by tests/oidc/package-lock.json.
if ! command -v node >/dev/null 2>&1; then
    echo "==> installing nodejs and npm"
    apt_install nodejs npm
fi
if [ ! tests/oidc/node_modules/.package-lock.json -nt tests/oidc/package-lock.json ]; then
    echo "==> npm ci --prefix tests/oidc (oidc-provider, jose)"
    npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
fi

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --locked --all-targets
