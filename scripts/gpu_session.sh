#!/usr/bin/env bash
# A GPU session's work, on the device machine, in two calls of at most 10 minutes (output: $OUT, a file per step):
#   run(command="source .device/setup.sh; STEPS='tests engine' bash scripts/gpu_session.sh", carry=[".device"])
#   run(command="source .device/setup.sh; STEPS=prefix bash scripts/gpu_session.sh", carry=[".device"])
# (after `bash ../shared/hooks/device-bundle.sh` and `bash scripts/device_extras.sh` here). Steps: the gpu tests
# and the Triton kernel tests, compiled; engine throughput of the Llama-3.2-1B shape in bf16 with both attention
# backends; prefix reuse with a local redis-server.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/extra/*.whl 2>&1 | tail -2
export KVTIER_CACHE_DIR=/tmp/kvtier-cache
STEPS=${STEPS:-"tests engine"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"

step() {  # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $?" | tee -a "$OUT/summary.txt"
}
bench=(python3 bench/engine_throughput.py --model llama3-1b-shape --dtype bfloat16 --prompt-len 512
       --decode-tokens 256 --batch-sizes 1,32,128 --plot "")
for s in $STEPS; do
    case $s in
    tests) step tests 150 python3 -m pytest -q -m gpu tests/gpu
           step triton 90 python3 -m pytest -q tests/integration/test_triton_attention.py ;;
    engine) step engine-torch 170 "${bench[@]}" --attention-backend torch
            step engine-triton 170 "${bench[@]}" --attention-backend triton ;;
    prefix) redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes > /dev/null
            step prefix 500 python3 bench/prefix_reuse.py --model llama3-1b-shape --dtype bfloat16 \
                --prefix-lens 4096,16384 --redis-url redis://127.0.0.1:6399/0 --plot "" ;;
    esac
done
tail -n 30 "$OUT"/*.txt
