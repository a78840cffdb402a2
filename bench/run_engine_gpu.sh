#!/usr/bin/env bash
# One call on a GPU machine: the engine's CUDA tests (tests/engine/test_engine_cuda.py) through a
# namespace dir of symlinks (the GPU image has torch, transformers, safetensors, tokenizers).
# Usage, from the repository root:  bash bench/run_engine_gpu.sh [OUTDIR]
set -uo pipefail
out=${1:-${OUT:-bench/results}}
mkdir -p "$out" /tmp/ss/splitserve
for d in model engine kernels bench tests kvtransfer protos router; do ln -sfn "$PWD/$d" "/tmp/ss/splitserve/$d"; done
export PYTHONPATH=/tmp/ss${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu-engine.txt"
python3 -m pytest tests/engine/test_engine_cuda.py tests/engine/test_engine.py -q -p no:cacheprovider -rfE \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/engine-cuda-pytest.log" | tail -15
