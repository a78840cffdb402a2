#!/usr/bin/env bash
# FP8 weights (issue 13) on one GPU: correctness first, then timings.
#  1. pytest at real shapes vs the references: block-scaled FP8 GEMM, FP8 grouped MoE, the sparse MLA
#     kernel reading the 656-byte FP8 latent entries, and the engine with FP8 weights + FP8 latents
#     (Triton kernels, CUDA graphs), every FP8 kernel call in the network checked against its reference;
#  2. the FP8 kernels alone against their floors (bench/fp8_kernels.py: fp8_linear at the real dense
#     shapes vs bf16 cuBLAS, a small launch sweep; sparse MLA over the bf16 vs the FP8 latent cache);
#  3. splitserve bench engine with bf16 and fp8 weights in the same process: decode step at batch
#     1, 8, 64 (context 4096) and a prefill of 8192 tokens, each against its roofline (bytes actually
#     read: e4m3 + scales + the bf16 rest), then the fp8/bf16 table;
#  4. the FP8 decode steps again with the FP8 latent cache (paged kernel path).
#  0. (stage `diagnose` only) bench/fp8_diagnose.py: each FP8 kernel at the real shapes vs its reference,
#     and every FP8 kernel call inside the small network / engine vs its reference (<= 2 min).
#  S. (stage `sweep` only, <= 5 min) the decode kernels: bench/fp8_sweep.py checks the weight-streaming
#     FP8 GEMV and decode MoE against their references at the real shapes, times old vs new per shape
#     against the byte floor and the copy bandwidth measured in the same run, sweeps launch configs per
#     M class (prints "table row" lines for GEMV_TABLE / MOE_GEMV_TABLE); then the engine decode step
#     bf16 vs fp8 at batch 1, 8, 64 (context 4096) with a per-kernel profile of batch 1.
#     Writes OUTDIR/gpu-fp8.txt, fp8-sweep.{log,json}, engine-decode.{log,json} (+ engine-decode-tiles.{log,json}
#     only if the engine failed with the new kernels: the old kernels' numbers for comparison).
# Usage, from the repository root:  bash bench/run_fp8_gpu.sh [OUTDIR] [all|tests|bench|diagnose|sweep]
#   all (default): 1-4, about 5-8 minutes on an H200 (the stage timeouts add up to 10.8 min at worst);
#   tests: stage 1 only (<= 3.5 min); bench: stages 2-4 only (<= 7.5 min).
# Writes: OUTDIR/fp8-diagnose.{log,json} (diagnose), OUTDIR/gpu-fp8.txt, fp8-pytest.log, fp8-kernels.{json,log}, engine-fp8.{json,log},
#         engine-fp8-latent.{json,log}
set -uo pipefail
out=${1:-${OUT:-bench/results}}
stage=${2:-all}
source bench/gpu_env.sh gpu-fp8.txt
start=$(date +%s)
if [ "$stage" = sweep ]; then
    timeout 220 python3 -m splitserve.bench.fp8_sweep --budget-s 180 --out "$out/fp8-sweep.json" 2>&1 | tee "$out/fp8-sweep.log"
    echo "sweep rc=${PIPESTATUS[0]}, took $(( $(date +%s) - start )) s"
    # pool: 64 sequences x 65 blocks of 64 tokens (context 4096) fit without wrapping
    timeout 170 python3 -m splitserve.bench.engine --weights bf16,fp8 --only decode --batches 1,8,64 --profile 1 \
        --pool-tokens 280000 --out "$out/engine-decode.json" 2>&1 | tee "$out/engine-decode.log"
    erc=${PIPESTATUS[0]}
    echo "engine rc=$erc, total $(( $(date +%s) - start )) s; files in $out"
    if [ "$erc" -ne 0 ] && [ "$erc" -ne 124 ]; then  # the new kernels failed in the engine: the old ones, for a baseline
        echo "!!! engine bench failed with the decode kernels: rerunning fp8 with --fp8-decode-kernels tiles"
        timeout 120 python3 -m splitserve.bench.engine --weights fp8 --only decode --batches 1,8,64 \
            --fp8-decode-kernels tiles --pool-tokens 280000 --out "$out/engine-decode-tiles.json" 2>&1 \
            | tee "$out/engine-decode-tiles.log" | tail -12
    fi
    grep -E "^(decode batch|fp8 \||bf16 \|)" "$out/engine-decode.log"
    exit 0
fi
if [ "$stage" = diagnose ]; then
    timeout 300 python3 -m splitserve.bench.fp8_diagnose --out "$out/fp8-diagnose.json" 2>&1 | tee "$out/fp8-diagnose.log"
    echo "diagnose rc=${PIPESTATUS[0]}, took $(( $(date +%s) - start )) s"
    exit 0
fi
if [ "$stage" != bench ]; then
    timeout 200 python3 -m pytest tests/kernels/test_fp8_gemm.py tests/kernels/test_moe.py tests/kernels/test_sparse_mla.py \
        tests/engine/test_fp8_cuda.py -q -p no:cacheprovider -rfE -o addopts="--import-mode=importlib" 2>&1 \
        | tee "$out/fp8-pytest.log" | tail -15
    rc=${PIPESTATUS[0]}
    echo "pytest rc=$rc, took $(( $(date +%s) - start )) s"
    [ "$rc" -ne 0 ] && echo "!!! FP8 correctness tests FAILED (see $out/fp8-pytest.log): timings are of kernels that disagree with their references"
fi
[ "$stage" = tests ] && exit 0
timeout 150 python3 -m splitserve.bench.fp8_kernels --out "$out/fp8-kernels.json" 2>&1 | tee "$out/fp8-kernels.log"
timeout 210 python3 -m splitserve.bench.engine --weights bf16,fp8 --only decode,prefill --batches 1,8,64 --prefill 8192 \
    --pool-tokens 600000 --out "$out/engine-fp8.json" 2>&1 | tee "$out/engine-fp8.log"
timeout 90 python3 -m splitserve.bench.engine --weights fp8 --latent fp8 --only decode --batches 1,8,64 \
    --pool-tokens 600000 --out "$out/engine-fp8-latent.json" 2>&1 | tee "$out/engine-fp8-latent.log" | tail -8
echo "total $(( $(date +%s) - start )) s; files in $out"
