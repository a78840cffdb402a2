#!/usr/bin/env bash
# One call on a GPU machine: the fused speculative step's CUDA tests (graphs = eager, warm-up captures
# everything, nothing captured while serving) and the MTP benchmark (bench/engine.py --only mtp,
# bench/mtp.py): engine step without MTP and with k = 1..3 at batch 1 and 32, a draft and the
# verification against their rooflines, the projected batch-1 speedup of the 61-layer model.
# Usage, from the repository root:  bash bench/run_mtp_gpu.sh [OUTDIR] [extra args for bench/engine.py]
# e.g. bash bench/run_mtp_gpu.sh bench/results --acceptance 0.8
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
source bench/gpu_env.sh gpu-mtp.txt
start=$(date +%s)
python3 -m pytest tests/engine/test_spec_step.py -q -p no:cacheprovider -rfE -k "cuda" \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/mtp-cuda-pytest.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
python3 -m splitserve.bench.engine --only mtp --out "$out/mtp.json" "$@" 2>&1 | tee "$out/mtp-bench.log"
echo "total $(( $(date +%s) - start )) s"
