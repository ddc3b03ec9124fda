#!/usr/bin/env bash
# Cheap performance regression check for CI (< 2 minutes): callgrind counts the instructions
# mesh-proxy (release) executes per request of the walkthrough's route (scenario seed+ratelimit) and compares them with
# bench/baseline.json (+15% allowed). `bench/regression.sh --update` rewrites the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
fi
cargo build --release -q -p mesh-proxy-cli -p mesh-bench --bins
exec target/release/mesh-bench regression --mesh-proxy target/release/mesh-proxy "$@"
