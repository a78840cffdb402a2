#!/usr/bin/env bash
# One call on a GPU machine: the top-k kernels' tests compiled on the GPU (tests/kernels/test_topk.py: every
# variant against the exact-order reference, real shapes, CUDA-graph replay), then bench/topk.py (torch.topk
# against each variant at rows {1,4,16,64,256} x widths {4096,16384,65536}, k=2048, from CUDA graphs).
# Usage, from the repository root:  bash bench/run_topk_gpu.sh [OUTDIR] [extra args for bench/topk.py]
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
source bench/gpu_env.sh gpu.txt
start=$(date +%s)
python3 -m pytest tests/kernels/test_topk.py -q -p no:cacheprovider -rfE 2>&1 | tee "$out/pytest-topk.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
python3 -m splitserve.bench.topk --out "$out/topk.json" "$@" 2>&1 | tee "$out/topk.log"
