#!/usr/bin/env bash
# One call on a GPU machine (< 6 minutes): the overlapped scheduler's tests on CUDA (tests/engine/
# test_overlap.py: overlapped = synchronous outputs with the Triton kernels and CUDA graphs; the sampler
# tests, whose code the overlapped step runs without host syncs), then the micro-benchmark
# (bench/overlap.py): decode step wall time vs GPU time (CUDA events) at batch 1/64/256, sync vs overlap.
# The package is reached through a namespace dir of symlinks (the GPU image has torch, triton; no install).
# Usage, from the repository root:  bash bench/run_overlap_gpu.sh [OUTDIR] [extra args for bench/overlap.py]
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
mkdir -p "$out" /tmp/ss
if [ -d /tmp/ss/splitserve ] && [ ! -L /tmp/ss/splitserve ]; then  # another script's folder of links
    for d in model engine kernels bench tests kvtransfer protos router deploy; do ln -sfn "$PWD/$d" "/tmp/ss/splitserve/$d"; done
else
    ln -sfn "$PWD" /tmp/ss/splitserve
fi
export PYTHONPATH=/tmp/ss${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$out/gpu-overlap.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu-overlap.txt"
start=$(date +%s)
timeout 240 python3 -m pytest tests/engine/test_overlap.py tests/engine/test_sampler.py -q -p no:cacheprovider -rfE \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/overlap-cuda-pytest.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
timeout 200 python3 -m splitserve.bench.overlap --out "$out/overlap.json" "$@" 2>&1 | tee "$out/overlap-bench.log"
echo "total $(( $(date +%s) - start )) s"
