#!/usr/bin/env bash
# Tensor / expert parallelism on a GPU machine, one call (from the repository root):
#   bash bench/run_tp_gpu.sh [OUTDIR] [CHECKPOINT]
# 1. tests: the two-rank test on one GPU (gloo on CUDA tensors: Triton kernels under TP, caches equal
#    one rank's) and the CPU TP tests;
# 2. bench/tp_decode.py on the `bench` preset (random FP8 weights, real DeepSeek-V3.2 widths, 4 layers):
#    TP1 (CUDA graphs, eager) vs TP2 [vs TP4, TP8 when the GPUs are there], then with expert parallelism;
# 3. with CHECKPOINT (the real DeepSeek-V3.2 directory) and 8 GPUs: the real model at TP8 and TP8+EP.
# Each bench run prints a table last and writes JSON under OUTDIR.
set -uo pipefail
out=${1:-${OUT:-bench/results/tp}}
ckpt=${2:-}
mkdir -p "$out" /tmp/ss/splitserve
for d in model engine kernels bench tests kvtransfer protos router deploy prefill_worker decode_worker; do
    ln -sfn "$PWD/$d" "/tmp/ss/splitserve/$d"
done
export PYTHONPATH=/tmp/ss${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
n=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$out/gpus.txt"
timeout 1200 python3 -m pytest tests/engine/test_tensor_parallel.py tests/model/test_sharded_load.py -q \
    -p no:cacheprovider -rfE -o addopts="--import-mode=importlib" 2>&1 | tee "$out/tp-pytest.log" | tail -5
ranks=1
for r in 2 4 8; do [ "$r" -le "$n" ] && ranks="$ranks,$r"; done
python3 -m splitserve.bench.tp_decode --ranks "$ranks" --batch 32 --context 4096 --out "$out/tp_decode_bench.json" 2>&1 \
    | tee "$out/tp_decode_bench.log" | tail -12
python3 -m splitserve.bench.tp_decode --ranks "${ranks#1,}" --ep --batch 32 --context 4096 \
    --out "$out/tp_decode_bench_ep.json" 2>&1 | tee "$out/tp_decode_bench_ep.log" | tail -8
python3 -m splitserve.bench.indexer_split --device cuda --ranks 2 --out "$out/indexer_split.json" 2>&1 | tail -6
if [ -n "$ckpt" ] && [ "$n" -ge 8 ]; then
    for ep in "" "--ep"; do
        python3 -m splitserve.bench.tp_decode --checkpoint "$ckpt" --ranks 8 $ep --batch 32 --context 4096 --steps 20 \
            --out "$out/tp_decode_dsv32${ep:+_ep}.json" 2>&1 | tee "$out/tp_decode_dsv32${ep:+_ep}.log" | tail -6
    done
fi
