#!/usr/bin/env bash
# Runs phantom-authz's whole test suite on a fresh Debian machine: installs what the tests need
# (redis-server), then checks formatting and lints and runs every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    fi
}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "==> installing redis-server"
    apt_install redis-server
    # The package may start a system instance; the tests start their own on free ports.
fi

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --locked --all-targets
