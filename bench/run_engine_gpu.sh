#!/usr/bin/env bash
# One call on a GPU machine: the engine's CUDA tests (tests/engine/test_engine_cuda.py: the Triton
# kernels and CUDA graphs inside the engine against cache-free scoring) and the kernel tests, then
# the engine benchmark (bench/engine.py). The package is reached through a namespace dir of
# symlinks (the GPU image has torch, triton, transformers, safetensors, tokenizers; no install).
# Usage, from the repository root:  bash bench/run_engine_gpu.sh [OUTDIR] [extra args for bench/engine.py]
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
source bench/gpu_env.sh gpu-engine.txt
start=$(date +%s)
python3 -m pytest tests/engine/test_engine_cuda.py tests/engine/test_engine.py tests/kernels -q -p no:cacheprovider -rfE \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/engine-cuda-pytest.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
python3 -m splitserve.bench.engine --out "$out/engine.json" "$@" 2>&1 | tee "$out/engine-bench.log"
