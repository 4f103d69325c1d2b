#!/usr/bin/env bash
# Installs kvtier and runs it on the embedded default: the built-in tiny model, generated locally (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvtier generate --model tiny --prompt "The quick brown fox" --max-tokens 32 --temperature 0.8 --seed 0 --json "$@"
