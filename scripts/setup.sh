#!/usr/bin/env bash
# Installs kvtier into ./.venv. Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh test
# torch goes in first and pinned (TORCH_SPEC), so no dependency can pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $torch_spec" >&2
    pip install "$torch_spec"
fi
echo "setup: installing kvtier${extras:+[$extras]}" >&2
pip install -e ".${extras:+[$extras]}"
