#!/usr/bin/env bash
# Regenerates the committed protobuf and gRPC stubs under protos/ (tests check that this changes nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/kvtier/v1/generation.proto
