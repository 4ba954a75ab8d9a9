#!/usr/bin/env bash
# Issue 31's GPU checks, for a session whose task is lent an NVIDIA machine by the device tool.
#
#   here:   bash scripts/gpu-bench.sh prepare
#           wheels for the device's Python 3.12 into .whl/ (what its image lacks; its own torch and
#           transformers are used) and Debian's redis-server into .deb/; both are git-ignored.
#   there:  device run, carry [".whl", ".deb"], timeout_s 600:
#           bash scripts/gpu-bench.sh throughput   # ~8 min: batch 1 (2 jobs) and batch 8 (8 jobs), eager fp16
#           bash scripts/gpu-bench.sh compiled     # the same with PRISM_COMPILE=cudagraph
#           bash scripts/gpu-bench.sh speed        # bench-speed, one timed run per row
#   Results land in $OUT (tables and JSON): copy them to docs/speed/gpu-sd15/ and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    diffusers==0.42.1 importlib_metadata rq==3.0.0 redis==8.1.0 croniter==7.0.0 python-dateutil
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv typing-inspection
    annotated-types pydicom==3.0.2 highdicom==0.28.2 pyjpegls
)

device_env() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    mkdir -p /tmp/redis
    for deb in .deb/*.deb; do dpkg -x "$deb" /tmp/redis; done
    export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/redis/usr/bin:$PATH" PYTHONUNBUFFERED=1
    export LD_LIBRARY_PATH="/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.csv"
}

case "${1:-}" in
prepare)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    mkdir -p .deb
    (cd .deb && apt-get download redis-server redis-tools libjemalloc2 liblzf1)
    du -sh .whl .deb
    ;;
throughput | compiled)
    device_env
    mode=off
    [ "$1" = compiled ] && mode=cudagraph
    python3 -m cli bench-throughput --model full-size --device cuda --dtype float16 --compile "$mode" \
        --batches 1,8 --jobs 8 --baseline-jobs 2 --out "$OUT" 2>&1 | tail -n 20
    ;;
speed)
    device_env
    python3 -m cli bench-speed --model full-size --device cuda --dtype float16 --repeats 1 --out "$OUT" 2>&1 |
        tail -n 20
    ;;
*)
    echo "usage: $0 prepare|throughput|compiled|speed" >&2
    exit 2
    ;;
esac
