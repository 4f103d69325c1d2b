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
# Two pytest workers, a test file each at a time (a file's module fixtures stay in one process): most of the
# suite waits on servers, Ray and timeouts, not the CPU. KVTIER_TEST_WORKERS=0 runs it in one process.
exec .venv/bin/python -m pytest -n "${KVTIER_TEST_WORKERS:-2}" --dist loadfile "$@"
