#!/usr/bin/env bash
# A short GPU lease (15 minutes of device time in all, at most 10 per command) in two commands of at most
# 9 minutes each, in the order the issues ask for: what real time goes where first, then the kernels, then the
# hybrid layout. Every step has its own deadline and writes JSON lines under OUT_DIR, so a step cut short
# still leaves what it measured; a failing step does not stop the next.
#
#   bash benchmarks/gpu_lease.sh 1 [OUT_DIR]   # V2-Lite size end to end (gpu_e2e.py, 32k and 128k, 24 GiB),
#                                              # then the decode kernels at V2-Lite's 16 heads (Triton, then
#                                              # Mosaic GPU on Hopper)
#   bash benchmarks/gpu_lease.sh 2 [OUT_DIR]   # V3 dims with the experts in host memory (gpu_e2e.py --hybrid),
#                                              # then gpu_check.sh's compiled kernel tests (the Mosaic kernel's
#                                              # included) and generation, then FP8 products against dequantizing
#
# OUT_DIR defaults to gpu_lease_out. Run from anywhere; it runs from the repository root.
set -u
cd "$(dirname "$0")/.."
PART="${1:-}"
OUT_DIR="${2:-gpu_lease_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
step() {  # step NAME SECONDS COMMAND...: one step under its own hard limit, its output in OUT_DIR/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo "== $name (at most ${limit} s) $(date +%T)"
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    echo "== $name: exit $? $(date +%T)"
    tail -n 3 "$OUT_DIR/$name.log"
}
case "$PART" in
    1)
        step gpu_e2e 330 "$PYTHON" benchmarks/gpu_e2e.py --deadline 300 --out "$OUT_DIR/gpu_e2e.jsonl"
        step kernels_16_heads 150 "$PYTHON" benchmarks/bench_mla_kernels.py --heads 16 --contexts 32768 131072 \
            --batches 1 8 --repeats 5 --keep-going --jsonl "$OUT_DIR/kernels_16_heads.jsonl"
        step mosaic_16_heads 60 "$PYTHON" benchmarks/bench_mla_kernels.py --kernel mosaic --formats bf16 \
            --heads 16 --contexts 32768 131072 --batches 1 8 --repeats 5 --keep-going \
            --jsonl "$OUT_DIR/mosaic_16_heads.jsonl"
        ;;
    2)
        step hybrid 290 "$PYTHON" benchmarks/gpu_e2e.py --hybrid --deadline 260 --out "$OUT_DIR/hybrid.jsonl"
        step gpu_check 210 "$PYTHON" benchmarks/gpu_check.py --out "$OUT_DIR/gpu_check" --budget 190 \
            --steps env pallas_tests generate
        step fp8_speed 40 "$PYTHON" benchmarks/bench_fp8.py speed --repeats 10
        ;;
    *)
        echo "usage: bash benchmarks/gpu_lease.sh 1|2 [OUT_DIR]" >&2
        exit 2
        ;;
esac
