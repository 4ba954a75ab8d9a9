#!/usr/bin/env bash
# The GPU checks, for a session whose task is lent an NVIDIA machine by the device tool: every
# measurement of the GPU issue in one call of at most 8 minutes. Each step runs in its own
# subshell under its own time cap, with its own log, so a step that fails or overruns leaves the
# others' results.
#
#   here:   bash scripts/gpu-bench.sh prepare    wheels the device's image lacks into .whl/ (its own torch
#                                                and transformers are used), Debian's redis-server into .deb/
#           bash scripts/gpu-bench.sh rehearse   every step on this CPU with a tiny model into a fake $OUT
#                                                (default /tmp/gpu-bench-rehearsal), a few minutes
#   there:  device run, carry [".whl", ".deb"], timeout_s 540:
#           bash scripts/gpu-bench.sh all        full-size SD v1.5 architecture (random weights), fp16 UNet
#
# Steps (cap in seconds): faithful (110) one null_text job alone, per phase, cold and cached;
# profile (50) a torch.profiler trace of three null-text inner steps; precision (100) one job in
# fp16 and in fp32 on the same input; throughput (110) pack 1 against pack 8, eager, at
# $THROUGHPUT_STEPS steps; cudagraph (100) the same pack 8 with PRISM_COMPILE=cudagraph.
# $OUT/steps.md lists each step's status and seconds; each step's tables are in $OUT/<step>/.
set -uo pipefail
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

# one step: its cap, its log, its line in steps.md; a failure is recorded, never fatal
step() {
    local name=$1 cap=$2
    shift 2
    local start=$SECONDS
    mkdir -p "$OUT/$name"
    (timeout --kill-after=5 "$cap" "$@") >"$OUT/$name/log.txt" 2>&1
    local rc=$? status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="stopped at its cap"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
    printf '| %s | %s | %d | %d |\n' "$name" "$status" $((SECONDS - start)) "$cap" | tee -a "$OUT/steps.md"
}

run_steps() {
    local common=(--model "$MODEL" --device "$DEVICE")
    local edit=(--steps "$STEPS" --inner-steps "$INNER")
    printf '| step | status | s | cap s |\n| --- | --- | --- | --- |\n' >"$OUT/steps.md"
    step faithful 110 $PRISM bench-speed "${common[@]}" --dtype "$DTYPE" --modes null_text --repeats 1 "${edit[@]}" \
        --out "$OUT/faithful"
    step profile 50 $PRISM bench-profile "${common[@]}" --dtype "$DTYPE" --inner-steps 3 --out "$OUT/profile"
    step precision 100 $PRISM bench-precision "${common[@]}" --dtypes "$DTYPE,float32" "${edit[@]}" \
        --out "$OUT/precision"
    local throughput=(bench-throughput "${common[@]}" --dtype "$DTYPE" --packs 8 --jobs 8 --baseline-jobs 2
        --steps "$THROUGHPUT_STEPS" --inner-steps "$INNER")
    step throughput 110 $PRISM "${throughput[@]}" --out "$OUT/throughput"
    step cudagraph 100 $PRISM "${throughput[@]}" --compile cudagraph --out "$OUT/cudagraph"
    cat "$OUT/steps.md"
}

case "${1:-}" in
prepare)
    set -e
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    mkdir -p .deb
    (cd .deb && apt-get download redis-server redis-tools libjemalloc2 liblzf1)
    du -sh .whl .deb
    ;;
all)
    device_env
    PRISM="python3 -m cli" MODEL=full-size DEVICE=cuda DTYPE=float16 STEPS=50 INNER=10 THROUGHPUT_STEPS=20 run_steps
    ;;
rehearse)
    export OUT="${OUT:-/tmp/gpu-bench-rehearsal}"
    rm -rf "$OUT" && mkdir -p "$OUT"
    [ -d "$OUT/tiny" ] || .venv/bin/prism make-tiny-model "$OUT/tiny" >/dev/null
    PRISM=.venv/bin/prism MODEL="$OUT/tiny" DEVICE=cpu DTYPE=bfloat16 STEPS=4 INNER=2 THROUGHPUT_STEPS=4 run_steps
    ;;
*)
    echo "usage: $0 prepare|rehearse|all" >&2
    exit 2
    ;;
esac
