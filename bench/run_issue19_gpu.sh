#!/usr/bin/env bash
# One call on a GPU machine for issue 19's decode goals: the GPU tests of the kernels this round touched, the
# engine bench (decode by batch with profiles, prefill) with the default kernels and with the reg top-k at
# every row count, the top-k bench, then the engine's CUDA tests. Each step bounded; logs and JSON to OUTDIR.
# Usage, from the repository root:  bash bench/run_issue19_gpu.sh OUTDIR [STEPS]   (STEPS: a subset of
# "kernels engine engine-reg topk engine-tests moe-sweep mla-tests", default all; also, not in the default:
# "glue-tests decode decode-triton-topk decode-pdl-off engine-tests-triton-topk capture-diag-reg")
set -uo pipefail
out=${1:?OUTDIR}
steps=${2:-kernels engine engine-reg topk engine-tests moe-sweep mla-tests}
source bench/gpu_env.sh gpu.txt >/dev/null
T="python3 -m pytest -q -p no:cacheprovider -rfE -o addopts=--import-mode=importlib"
E="python3 -m splitserve.bench.engine --pool-tokens 1100000"
# python snippets for the -c steps: the top-k dispatch (MIN_ROWS, REG_MAX_WIDTH), torch.cuda.graph's capture mode,
# pytest on the remaining arguments
topk_set='import sys, pytest, torch; from splitserve.kernels import radix_topk as R
def topk_set(m, w): R.MIN_ROWS, R.REG_MAX_WIDTH = m, w
topk_set'
graph_mode='def graph_mode(mode):
    init = torch.cuda.graph.__init__
    def patched(self, *a, **k):
        k.setdefault("capture_error_mode", mode)
        init(self, *a, **k)
    torch.cuda.graph.__init__ = patched
graph_mode'
pdl_off='import sys, pytest; from splitserve.kernels import _common; _common.PDL = False'
pytest_run='sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rfE", "-o", "addopts=--import-mode=importlib", *sys.argv[1:]]))'
step() { echo "== $1 $(date +%T)"; }
for s in $steps; do
    step "$s"
    case $s in
    kernels) timeout 300 $T tests/kernels/test_fp32_gemm.py tests/kernels/test_topk.py tests/kernels/test_pdl.py \
        tests/kernels/test_moe.py >"$out/t-kernels.log" 2>&1
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
        tail -5 "$out/t-engine-cuda.log"
        if grep -qE "[0-9]+ (failed|error)" "$out/t-engine-cuda.log"; then  # the same without PDL, to tell
            echo "-- again with kernels/_common.py PDL off"
            timeout 200 python3 -c "$pdl_off
$pytest_run" tests/engine/test_engine_cuda.py >"$out/t-engine-cuda-pdl-off.log" 2>&1
            tail -3 "$out/t-engine-cuda-pdl-off.log"
        fi ;;
    moe-sweep) timeout 200 python3 -m splitserve.bench.sweep_kernels --mla-rows "" --mla-fp8-rows "" \
        --moe-tokens 256 --out "$out/sweep-moe.json" >"$out/sweep-moe.log" 2>&1
        grep -E "^moe" "$out/sweep-moe.log" | cut -c1-150 ;;
    glue-tests) timeout 150 $T tests/kernels/test_fp32_gemm.py tests/kernels/test_sparse_mla.py \
        tests/kernels/test_cache_write.py tests/kernels/test_pdl.py >"$out/t-glue.log" 2>&1
        tail -3 "$out/t-glue.log" ;;
    decode) timeout 200 $E --only decode --batches 1,64,256 --profile 1,64,256 --out "$out/decode.json" \
        >"$out/decode.log" 2>&1
        grep -E "^bf16 \||ceilings" "$out/decode.log" ;;
    decode-triton-topk) timeout 150 $E --only decode --batches 1,64 --topk triton --profile 1 \
        --out "$out/decode-triton-topk.json" >"$out/decode-triton-topk.log" 2>&1
        grep -E "^bf16 \||ceilings" "$out/decode-triton-topk.log" ;;
    decode-pdl-off) timeout 150 $E --only decode --batches 1,64 --pdl off --profile 1 \
        --out "$out/decode-pdl-off.json" >"$out/decode-pdl-off.log" 2>&1
        grep -E "^bf16 \||ceilings" "$out/decode-pdl-off.log" ;;
    engine-tests-triton-topk) timeout 200 python3 -c "$topk_set(1, 0)
$pytest_run" tests/engine/test_engine_cuda.py \
        >"$out/t-engine-cuda-triton-topk.log" 2>&1
        tail -3 "$out/t-engine-cuda-triton-topk.log" ;;
    capture-diag-reg) for mode in global thread_local relaxed; do
        timeout 100 python3 -c "$topk_set(1, 4096)
$graph_mode('$mode')
$pytest_run" \
            "tests/engine/test_engine_cuda.py::test_warm_up_captures_every_size_and_nothing_while_serving" \
            >"$out/capture-diag-reg-$mode.log" 2>&1
        echo "$mode: $(tail -n 1 "$out/capture-diag-reg-$mode.log")"; done ;;
    mla-tests) timeout 120 $T tests/kernels/test_sparse_mla.py >"$out/t-sparse-mla.log" 2>&1
        tail -3 "$out/t-sparse-mla.log" ;;
    esac
done
step done
