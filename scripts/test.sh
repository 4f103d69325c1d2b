#!/usr/bin/env bash
# Installs everything the test suite needs (venv, kvtier[test,bench], redis-server) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
    echo "test: installing redis-server" >&2
    sudo_cmd=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $sudo_cmd apt-get update -q && $sudo_cmd apt-get install -y -q redis-server
fi
bash scripts/setup.sh test,bench  # bench: matplotlib, for the `kvtier bench` tests
exec .venv/bin/python -m pytest "$@"
