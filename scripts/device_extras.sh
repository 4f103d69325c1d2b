#!/usr/bin/env bash
# Run here, after `bash ../shared/hooks/device-bundle.sh`: adds to .device/extra the wheels kvtier needs that the
# GPU machine lacks or has in other versions (its Python is 3.12), pinned to what this checkout was tested with.
# Then one device `run` (carry [".device"]) does a whole GPU session: see scripts/gpu_session.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .device/setup.sh ] || { echo "device_extras: run bash ../shared/hooks/device-bundle.sh first" >&2; exit 1; }
mkdir -p .device/extra
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/extra xxhash prometheus-client "grpcio==1.85.1" "grpcio-health-checking==1.85.1" \
    "grpcio-reflection==1.85.1" "protobuf==7.36.2"
du -sh .device
