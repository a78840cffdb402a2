#!/usr/bin/env bash
# One call on a GPU machine for issue 19's decode goals: the GPU tests of the kernels this round touched, the
# engine bench (decode by batch with profiles, prefill) with the default kernels and with the reg top-k at
# every row count, the top-k bench, then the engine's CUDA tests. Each step bounded; logs and JSON to OUTDIR.
# Usage, from the repository root:  bash bench/run_issue19_gpu.sh OUTDIR [STEPS]   (STEPS: a subset of
# "kernels engine engine-reg topk engine-tests moe-sweep mla-tests", default all)
set -uo pipefail
out=${1:?OUTDIR}
steps=${2:-kernels engine engine-reg topk engine-tests moe-sweep mla-tests}
source bench/gpu_env.sh gpu.txt >/dev/null
T="python3 -m pytest -q -p no:cacheprovider -rfE -o addopts=--import-mode=importlib"
E="python3 -m splitserve.bench.engine --pool-tokens 1100000"
step() { echo "== $1 $(date +%T)"; }
for s in $steps; do
    step "$s"
    case $s in
    kernels) timeout 240 $T tests/kernels/test_fp32_gemm.py tests/kernels/test_topk.py \
        "tests/kernels/test_moe.py::test_fused_moe_gpu_real_shapes" >"$out/t-kernels.log" 2>&1
        tail -3 "$out/t-kernels.log" ;;
    engine) timeout 300 $E --only decode,prefill --batches 1,64,256 --prefill 1024,8192 --profile 1,64,256 \
        --out "$out/engine.json" >"$out/engine.log" 2>&1
        grep -E "^bf16 \||ceilings" "$out/engine.log" ;;
    engine-reg) timeout 200 $E --only decode --batches 1,64,256 --topk reg --profile 1 \
        --out "$out/engine-reg.json" >"$out/engine-reg.log" 2>&1
        grep -E "^bf16 \||ceilings" "$out/engine-reg.log" ;;
    topk) timeout 200 python3 -m splitserve.bench.topk --rows 1,8,64,256 --widths 4096,8192 \
        --out "$out/topk.json" >"$out/topk.log" 2>&1
        tail -25 "$out/topk.log" ;;
    engine-tests) timeout 300 $T tests/engine/test_engine_cuda.py >"$out/t-engine-cuda.log" 2>&1
        tail -5 "$out/t-engine-cuda.log" ;;
    moe-sweep) timeout 200 python3 -m splitserve.bench.sweep_kernels --mla-rows "" --mla-fp8-rows "" \
        --moe-tokens 256 --out "$out/sweep-moe.json" >"$out/sweep-moe.log" 2>&1
        grep -E "^moe" "$out/sweep-moe.log" | cut -c1-150 ;;
    mla-tests) timeout 120 $T tests/kernels/test_sparse_mla.py >"$out/t-sparse-mla.log" 2>&1
        tail -3 "$out/t-sparse-mla.log" ;;
    esac
done
step done
