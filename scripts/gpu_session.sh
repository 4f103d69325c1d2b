#!/usr/bin/env bash
# A GPU session's work in ONE device call. A task is lent 15 minutes of device time in all, the machine's start
# (a minute or more) included, and one call may run 10, so plan on one call:
#   run(command="source .device/setup.sh; bash scripts/gpu_session.sh", carry=[".device"], timeout_s=600)
# after `bash ../shared/hooks/device-bundle.sh` and `bash scripts/device_extras.sh` here. The machine stays warm
# 30 s after a call: a second call (STEPS=what was skipped) must follow at once or it pays another start.
#
# Steps run in STEPS order, by default the order of their value (the two short steps that finish issues 2 and 3
# first; issue 6 needs more than one call's time in any case):
#   tests     the gpu tests, the Triton kernel tests compiled, and on CUDA: computing while reading Redis,
#             several requests' reads at once, random workloads with every tier on (the numbers mean nothing
#             until these pass)
#   engine    engine throughput of the 1B shape, bf16, torch attention (issue 2's H100 table)
#   prefix    prefix reuse of the 1B shape at 16k, torch attention, CPU->GPU against pinned upload (issue 3's)
#   redisread Redis -> host read rate on this host, redis-py's MGET against the streamed one, 1-8 connections
#   rediswrite host -> Redis write rate, one connection, redis-py's pipeline against values sent in parts
#   fast1b    issue 6's table for the Llama-3.2-1B shape, bf16: bench/against_transformers.py
#   fast8b    the same for the Llama-3-8B shape
#   prefix8b  prefix reuse of the 8B shape at 16k and 32k, a 256-token question, Redis on loopback
#   engine-triton  engine throughput of the 1B shape with the Triton backend (not in the default)
# Each step gets at most its own cap and what is left before DEADLINE_S (seconds from the start, default 540),
# so the call ends inside its limit with every finished step's output in $OUT (a file per step, summary.txt
# with each step's exit code and seconds). A step with too little time left is listed as skipped, not started.
# The built-in random-weight models a step needs are generated in the background from the start, on the CPU,
# while the tests use the GPU. Last, bench/acceptance.py judges issue 6's points from the steps' JSON (kept in
# /tmp/kvtier-json) and appends its table to summary.txt. DRY_RUN=1 prints the plan and runs nothing
# (tests/integration/test_gpu_session_plan.py checks it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvtier-gpu}
STEPS=${STEPS:-"tests engine prefix redisread rediswrite fast1b fast8b prefix8b"}
DEADLINE_S=${DEADLINE_S:-540}
MIN_STEP_S=${MIN_STEP_S:-45}
DRY_RUN=${DRY_RUN:-}
export PYTHONUNBUFFERED=1 KVTIER_CACHE_DIR=${KVTIER_CACHE_DIR:-/tmp/kvtier-cache}
mkdir -p "$OUT" /tmp/kvtier-json
began=$SECONDS

redis=redis://127.0.0.1:6399/0
json=/tmp/kvtier-json  # the benchmarks' full numbers stay there; bench/acceptance.py reads them at the end
fast=(python3 bench/against_transformers.py --dtype bfloat16 --redis-url $redis)
prefix=(python3 bench/prefix_reuse.py --dtype bfloat16 --attention-backend triton --redis-url $redis --plot "")
bench=(python3 bench/engine_throughput.py --model llama3-1b-shape --dtype bfloat16 --prompt-len 512
       --decode-tokens 256 --batch-sizes 1,8,32 --plot "")  # issue 2's batch sizes

step() {  # name, cap in seconds, the preset it loads (or -), command...: run it for at most min(cap, time left)
    local name=$1 cap=$2 model=$3; shift 3
    if [ -n "$DRY_RUN" ]; then printf '%s %s' "$name" "$cap"; printf ' %q' "$@"; echo; return; fi
    if [ "$(time_left)" -lt "$MIN_STEP_S" ]; then
        echo "== $name: skipped, $(time_left)s left before the deadline" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$model" = - ] || wait_for_model "$model"
    local left; left=$(time_left)
    local limit=$((cap < left ? cap : left))
    local busy=""  # CPU work beside the step may move its host-bound numbers: say so next to them
    kill -0 "$models_pid" 2> /dev/null && busy=" (while models are being generated)"
    echo "== $name (at most ${limit}s)$busy: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
}
time_left() { echo $((DEADLINE_S - (SECONDS - began))); }
wait_for_model() {  # until the background generation has written this preset, has stopped, or time is up
    while [ ! -e "$ready/$1" ] && kill -0 "$models_pid" 2> /dev/null && [ "$(time_left)" -gt 0 ]; do sleep 1; done
}
start_redis() {
    [ -n "$DRY_RUN" ] || redis-cli -p 6399 ping > /dev/null 2>&1 ||
        redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no --io-threads 4 \
            --io-threads-do-reads yes --daemonize yes > /dev/null
}
models_for() {  # the presets the steps will load, in the order they need them
    local wanted=()
    for s in $STEPS; do
        case $s in
        engine|engine-triton|prefix|fast1b) wanted+=(llama3-1b-shape) ;;
        fast8b|prefix8b) wanted+=(llama3-8b-shape) ;;
        esac
    done
    printf '%s\n' "${wanted[@]}" | awk 'NF && !seen[$0]++' | tr '\n' ' '
}

models_pid=
if [ -z "$DRY_RUN" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/extra/*.whl 2>&1 | tail -2
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      nproc; free -g | head -2; } >> "$OUT/summary.txt" 2>&1
    ready=$(mktemp -d)
    (for model in $(models_for); do nice python3 -m workers.presets "$model" && touch "$ready/$model"; done) \
        > "$OUT/models.txt" 2>&1 &
    models_pid=$!
fi
for s in $STEPS; do
    case $s in
    tests) step tests 200 - python3 -m pytest -q -rfE --durations=15 -p no:cacheprovider tests/gpu \
               tests/integration/test_triton_attention.py tests/integration/test_compute_while_reading.py \
               tests/integration/test_concurrent_prefetches.py tests/integration/test_random_workloads.py ;;
    redisread) start_redis; step redisread 60 - python3 bench/redis_read.py --redis-url $redis --values 256 \
                   --connections 1,4,8 --repeats 3 ;;
    rediswrite) start_redis; step rediswrite 40 - python3 bench/redis_write.py --redis-url $redis --repeats 3 ;;
    fast1b) start_redis; step fast1b 200 llama3-1b-shape "${fast[@]}" --model llama3-1b-shape \
                --json-out $json/fast1b.json ;;
    fast8b) start_redis; step fast8b 300 llama3-8b-shape "${fast[@]}" --model llama3-8b-shape \
                --kv-cache-memory 20GiB --transformers-batch-sizes 1,128 --json-out $json/fast8b.json ;;
    prefix8b) start_redis; step prefix8b 300 llama3-8b-shape "${prefix[@]}" --model llama3-8b-shape \
                  --prefix-lens 16384,32768 --question-len 256 --read-parallelism 4 --compare-reading \
                  --json-out $json/prefix8b.json ;;
    engine) step engine 120 llama3-1b-shape "${bench[@]}" --attention-backend torch ;;
    engine-triton) step engine-triton 120 llama3-1b-shape "${bench[@]}" --attention-backend triton ;;
    prefix) start_redis; step prefix 150 llama3-1b-shape "${prefix[@]}" --model llama3-1b-shape \
                --attention-backend torch --prefix-lens 16384 --json-out $json/prefix1b.json ;;
    *) echo "gpu_session: unknown step '$s'" >&2; exit 2 ;;
    esac
done
[ -n "$DRY_RUN" ] && exit 0
pkill -P "$models_pid" 2> /dev/null; kill "$models_pid" 2> /dev/null  # a model no step got to
python3 bench/acceptance.py --fast1b $json/fast1b.json --fast8b $json/fast8b.json --prefix8b $json/prefix8b.json \
    2>&1 | tee -a "$OUT/summary.txt"
echo "== done after $((SECONDS - began))s" | tee -a "$OUT/summary.txt"
tail -n 25 "$OUT"/*.txt
