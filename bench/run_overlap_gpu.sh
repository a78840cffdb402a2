#!/usr/bin/env bash
# One call on a GPU machine (< 6 minutes): the overlapped scheduler's tests on CUDA (tests/engine/
# test_overlap.py: overlapped = synchronous outputs with the Triton kernels and CUDA graphs; the sampler
# tests, whose code the overlapped step runs without host syncs), then the micro-benchmark
# (bench/overlap.py): decode step wall time vs GPU time (CUDA events) at batch 1/64/256, sync vs overlap.
# The package is reached through a namespace dir of symlinks (the GPU image has torch, triton; no install).
# Usage, from the repository root:  bash bench/run_overlap_gpu.sh [OUTDIR] [extra args for bench/overlap.py]
# (e.g. --mtp 1: the fused MTP step, sync vs overlapped)
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
source bench/gpu_env.sh gpu-overlap.txt
start=$(date +%s)
timeout 240 python3 -m pytest tests/engine/test_overlap.py tests/engine/test_sampler.py -q -p no:cacheprovider -rfE \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/overlap-cuda-pytest.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
timeout 200 python3 -m splitserve.bench.overlap --out "$out/overlap.json" "$@" 2>&1 | tee "$out/overlap-bench.log"
echo "total $(( $(date +%s) - start )) s"
