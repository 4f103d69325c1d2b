#!/usr/bin/env bash
# A GPU session's work, on the device machine, in calls of at most 10 minutes (output: $OUT, a file per step):
#   run(command="source .device/setup.sh; STEPS='tests fast1b' bash scripts/gpu_session.sh", carry=[".device"])
#   run(command="source .device/setup.sh; STEPS=fast8b bash scripts/gpu_session.sh", carry=[".device"])
#   run(command="source .device/setup.sh; STEPS=prefix8b bash scripts/gpu_session.sh", carry=[".device"])
# (after `bash ../shared/hooks/device-bundle.sh` and `bash scripts/device_extras.sh` here). Steps:
#   tests     the gpu tests and the Triton kernel tests, compiled
#   fast1b    issue 6's table for the Llama-3.2-1B shape, bf16: bench/against_transformers.py
#   fast8b    the same for the Llama-3-8B shape
#   prefix8b  prefix reuse of the 8B shape at 16k and 32k, a 256-token question, Redis on loopback
#   engine    engine throughput of the 1B shape with each attention backend
#   prefix    prefix reuse of the 1B shape at 4k and 16k
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
start_redis() {
    redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no --io-threads 4 --io-threads-do-reads yes \
        --daemonize yes > /dev/null
}
redis=redis://127.0.0.1:6399/0
fast=(python3 bench/against_transformers.py --dtype bfloat16 --redis-url $redis)
prefix=(python3 bench/prefix_reuse.py --dtype bfloat16 --attention-backend triton --redis-url $redis --plot "")
bench=(python3 bench/engine_throughput.py --model llama3-1b-shape --dtype bfloat16 --prompt-len 512
       --decode-tokens 256 --batch-sizes 1,32,128 --plot "")
for s in $STEPS; do
    case $s in
    tests) step tests 240 python3 -m pytest -q -m gpu tests/gpu
           step triton 90 python3 -m pytest -q tests/integration/test_triton_attention.py ;;
    fast1b) start_redis; step fast1b 400 "${fast[@]}" --model llama3-1b-shape --json-out "$OUT/fast1b.json" ;;
    fast8b) start_redis; step fast8b 570 "${fast[@]}" --model llama3-8b-shape --kv-cache-memory 20GiB ;;
    prefix8b) start_redis; step prefix8b 570 "${prefix[@]}" --model llama3-8b-shape --prefix-lens 16384,32768 \
                  --question-len 256 --read-parallelism 4 ;;
    engine) step engine-torch 170 "${bench[@]}" --attention-backend torch
            step engine-triton 170 "${bench[@]}" --attention-backend triton ;;
    prefix) start_redis; step prefix 500 "${prefix[@]}" --model llama3-1b-shape --prefix-lens 4096,16384 ;;
    esac
done
tail -n 30 "$OUT"/*.txt
