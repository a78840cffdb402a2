#!/usr/bin/env bash
# One call on a GPU machine (< 8 min on an H200): the decode-glue kernels' CUDA tests (radix top-k,
# fused cache write, the indexer, every kernel test) and the engine's CUDA tests, then the decode
# step at batch 1 and 64 (context 4096, bench preset) twice, profiled: --glue unfused (torch.topk,
# the separate norm / rope / quantise / index_put ops: the path before) and --glue fused. Each
# profile prints the kernel-time table, "kernels per step" (graph replay) and kernels per decoder
# layer (eager) with the layer's kernels by name (bench/kernel_count.py).
# Usage, from the repository root:  bash bench/run_glue_gpu.sh [OUTDIR] [extra args for bench/engine.py]
set -uo pipefail
out=${1:-${OUT:-bench/results}}
shift || true
source bench/gpu_env.sh gpu-glue.txt
start=$(date +%s)
timeout 180 python3 -m pytest tests/kernels tests/engine/test_engine_cuda.py -q -p no:cacheprovider -rfE \
    -o addopts="--import-mode=importlib" 2>&1 | tee "$out/glue-pytest.log" | tail -15
echo "pytest took $(( $(date +%s) - start )) s"
for glue in unfused fused; do
    timeout 140 python3 -m splitserve.bench.engine --only decode --batches 1,64 --profile 1,64 --pool-tokens 300000 \
        --glue "$glue" --out "$out/glue-$glue.json" "$@" 2>&1 | tee "$out/glue-$glue-bench.log"
done
grep -h "kernels per step\|per decoder layer\|^weights\|^bf16\|^fp8" "$out"/glue-*-bench.log
echo "total $(( $(date +%s) - start )) s"
