#!/usr/bin/env bash
# One call on a GPU machine: GPU correctness (tests/kernels, compiled kernels, small + real shapes),
# then the kernel benchmark (its own correctness check at bench shapes, then timings).
# Usage, from the repository root:  bash bench/run_kernels_gpu.sh [OUTDIR] [extra args for the benchmark]
# Needs torch + triton + pytest; the package is reached through a namespace dir of symlinks, so no
# install step is needed (the GPU image lacks the cluster's dependencies, which kernels don't use).
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
source bench/gpu_env.sh gpu.txt
start=$(date +%s)
python3 -m pytest tests/kernels -q -p no:cacheprovider -rfE 2>&1 | tee "$out/pytest.log" | tail -25
echo "pytest took $(( $(date +%s) - start )) s"
python3 -m splitserve.bench.kernels --out "$out/kernels.json" "$@" 2>&1 | tee "$out/bench.log"
