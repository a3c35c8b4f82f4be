#!/usr/bin/env bash
# One GPU check of ktjax (NVIDIA H100/H200, JAX with CUDA): compiled Pallas tests, the MLA kernel benchmark
# per cache format against the XLA path and the copy bandwidth, and a short generation per cache format with
# --attention pallas and xla. Writes OUT_DIR/gpu_check.json (default gpu_check_out) and prints a summary.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [more benchmarks/gpu_check.py flags]
#
# Run from the repository root. Each step has its own timeout inside a 450 s budget; the whole command is
# stopped after 8 minutes at the latest (the JSON is rewritten after every step, so it survives that).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-gpu_check_out}"
shift || true
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # each step is its own process; none holds 75% of the GPU
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
PYTHON="${PYTHON:-python}"
timeout -k 10 470 "$PYTHON" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: stopped at the 8-minute limit; partial results in $OUT_DIR/gpu_check.json" >&2
fi
exit "$rc"
