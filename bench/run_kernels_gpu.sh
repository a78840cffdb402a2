#!/usr/bin/env bash
# One call on a GPU machine: GPU correctness (tests/kernels, compiled kernels, small + real shapes),
# then the kernel benchmark (its own correctness check at bench shapes, then timings).
# Usage, from the repository root:  bash bench/run_kernels_gpu.sh [OUTDIR] [extra args for the benchmark]
# Needs torch + triton + pytest; the package is reached through a namespace dir of symlinks, so no
# install step is needed (the GPU image lacks the cluster's dependencies, which kernels don't use).
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
mkdir -p "$out" /tmp/ss/splitserve
for d in model engine kernels bench tests; do ln -sfn "$PWD/$d" "/tmp/ss/splitserve/$d"; done
export PYTHONPATH=/tmp/ss${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
start=$(date +%s)
python3 -m pytest tests/kernels -q -p no:cacheprovider -rfE 2>&1 | tee "$out/pytest.log" | tail -25
echo "pytest took $(( $(date +%s) - start )) s"
python3 -m splitserve.bench.kernels --out "$out/kernels.json" "$@" 2>&1 | tee "$out/bench.log"
