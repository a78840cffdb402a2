#!/usr/bin/env bash
# One call on a GPU machine: the engine's CUDA tests (tests/engine/test_engine_cuda.py: the Triton
# kernels and CUDA graphs inside the engine against cache-free scoring) and the kernel tests, then
# the engine benchmark (bench/engine.py). The package is reached through a namespace dir of
# symlinks (the GPU image has torch, triton, transformers, safetensors, tokenizers; no install).
# Usage, from the repository root:  bash bench/run_engine_gpu.sh [OUTDIR] [extra args for bench/engine.py]
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
mkdir -p "$out" /tmp/ss/splitserve
for d in model engine kernels bench tests kvtransfer protos router; do ln -sfn "$PWD/$d" "/tmp/ss/splitserve/$d"; done
export PYTHONPATH=/tmp/ss${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$out/gpu-engine.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu-engine.txt"
start=$(date +%s)
python3 -m pytest tests/engine/test_engine_cuda.py tests/engine/test_engine.py tests/kernels -q -p no:cacheprovider -rfE \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/engine-cuda-pytest.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
python3 -m splitserve.bench.engine --out "$out/engine.json" "$@" 2>&1 | tee "$out/engine-bench.log"
