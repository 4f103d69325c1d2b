#!/usr/bin/env bash
# Installs kvtier and starts a cluster on the embedded default: a local Ray, two workers on the built-in tiny
# model (generated locally, no downloads), and the gRPC router on 127.0.0.1:50051. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvtier serve "$@"
