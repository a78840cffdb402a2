#!/usr/bin/env bash
# The cluster on ONE GPU, end to end (deploy/gpu-1gpu.yaml: 1 prefill + 1 decode worker sharing the GPU,
# NIXL over UCX cuda_ipc between them), then the co-located pair on the same GPU as the baseline.
# Prints a table last and writes JSON into $OUT (default /tmp/out). Run from the repository root on a
# GPU machine after the wheel stages of ../shared/device/README.md (it sources /tmp/site/env.sh if there).
#
# Parts (PARTS, in this order; each bounded by `timeout`):
#   tests     GPU tests of this work: warm start (every graph captured before ready, none after a mixed
#             load), the staging copy kernel                                                   (~1-2 min)
#   engine    the engine alone: prefill + first token of TTFT_LENS tokens (no cluster)         (~1 min)
#   disagg    1P1D: up, openai client flow (completions, chat, streaming), uncontended TTFT per stage,
#             bench serve long-prompt (4k in / 256 out) and chat (1k in / 512 out) at RATES, the
#             workers' CUDA-graph counters (misses after ready must be 0), down               (~5 min)
#   coloc     two co-located decode workers on the same GPU: up, client flow, the same serve runs, down
#                                                                                              (~4 min)
#   transfer  splitserve bench transfer --device cuda: contiguous, scattered, scattered -> staged and
#             one region of the same bytes, TRANSFER_TOKENS                                     (~1-2 min)
#   summary   the tables (always runs last)
# Suggested for two device calls of <= 9 min each:
#   PARTS="tests engine disagg transfer" bash bench/run_cluster_gpu.sh      then
#   PARTS="coloc" bash bench/run_cluster_gpu.sh                              (same $OUT: the summary has both)
# Knobs: NP (prompts per serve run, 24), RATES ("2 4 8 16"), LONG ("4096 256"), CHAT ("1024 512"),
# WORKLOADS ("long chat"), TTFT_LENS ("1024 4096"), TRANSFER_TOKENS ("4096 16384 32768"), MTP (0),
# MPS (1: run the disagg/coloc parts under an NVIDIA MPS server started here in /tmp/mps and stopped after
# them, so the two workers' kernels share the GPU's SMs instead of time-slicing; their files get the suffix
# "-mps": ttft-disagg-mps.json, serve-disagg-mps-*.json, ...; the summary table lists serve runs of both),
# PART_TIMEOUT (s per part, 420), CKPT (/tmp/splitserve-ckpt-bench), PRESET (bench), DEVICE (cuda; cpu: a
# dry run of the disagg/coloc parts with CKPT=tiny checkpoint, small lengths).
set -uo pipefail
[[ -f /tmp/site/env.sh ]] && source /tmp/site/env.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"; t0=$(date +%s)
PY=${PY:-python3}
PARTS=${PARTS:-"tests engine disagg coloc transfer"}
NP=${NP:-24}; RATES=${RATES:-"2 4 8 16"}; LONG=${LONG:-"4096 256"}; CHAT=${CHAT:-"1024 512"}
WORKLOADS=${WORKLOADS:-"long chat"}; TTFT_LENS=${TTFT_LENS:-"1024 4096"}
TRANSFER_TOKENS=${TRANSFER_TOKENS:-"4096 16384 32768"}; PART_TIMEOUT=${PART_TIMEOUT:-420}
PRESET=${PRESET:-bench}; CKPT=${CKPT:-/tmp/splitserve-ckpt-$PRESET}; MTP=${MTP:-0}
URL=http://127.0.0.1:8000
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }

if ! $PY -c "import splitserve" 2>/dev/null || [[ -n ${REINSTALL:-} ]]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
fi
if [[ ! -f $CKPT/config.json ]]; then
  say "making the $PRESET checkpoint at $CKPT"
  timeout 600 splitserve make-checkpoint --preset "$PRESET" --out "$CKPT" 2>&1 | tail -1
fi
H="$PY -m splitserve.bench.cluster_gpu"
$H config --base deploy/gpu-1gpu.yaml --ckpt "$CKPT" --mode disaggregated --mtp "$MTP" --device "${DEVICE:-cuda}" --out "$out/cluster-disagg.yaml"
$H config --base deploy/gpu-1gpu.yaml --ckpt "$CKPT" --mode colocated --decode-replicas 2 --mtp "$MTP" --device "${DEVICE:-cuda}" --out "$out/cluster-coloc.yaml"

SUFFIX=""; [[ ${MPS:-0} == 1 ]] && SUFFIX=-mps
mps_start() {  # only around the cluster parts: the tests, engine and transfer parts run as usual
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && say "MPS server started (pipe $CUDA_MPS_PIPE_DIRECTORY)" || { say "MPS could not start"; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control; say "MPS server stopped"' EXIT
}
cluster_down() { timeout 120 splitserve down > /dev/null 2>&1; cp ~/.cache/splitserve/run/*.log "$out/logs-$1/" 2>/dev/null; }

serve_runs() {  # $1: cluster name
  for w in $WORKLOADS; do
    case $w in long) set -- "$1" $LONG;; chat) set -- "$1" $CHAT;; *) continue;; esac
    say "bench serve $1 $w: $2 in / $3 out, $NP prompts, rates $RATES"
    timeout $(( PART_TIMEOUT / 2 )) splitserve bench serve --url $URL --num-prompts "$NP" --input-len "$2" \
      --output-len "$3" --request-rate $RATES --warmup 2 --cluster "$1 on one GPU, $PRESET preset" \
      --out "$out/serve-$1-$w.json" 2>&1 | tail -$(( $(wc -w <<< "$RATES") * 2 + 3 ))
    set -- "$1"
  done
}

run_cluster() {  # $1: disagg | coloc
  local name=$1 tag=$1$SUFFIX; mkdir -p "$out/logs-$tag"
  say "starting the $name cluster"
  if ! timeout 400 splitserve up "$out/cluster-$name.yaml" --detach > "$out/logs-$tag/up.log" 2>&1; then
    say "up failed:"; tail -20 "$out/logs-$tag/up.log"; cluster_down "$tag"; return 1
  fi
  say "up"; splitserve status
  grep -h "warm-up:" ~/.cache/splitserve/run/*.log 2>/dev/null | tail -4
  $H client-flow --url $URL --out "$out/flow-$tag.json"
  [[ $name == disagg ]] && $H ttft --url $URL --lengths $TTFT_LENS --out "$out/ttft-$tag.json"
  serve_runs "$tag"
  $H graphs --url $URL --out "$out/graphs-$tag.json"
  splitserve status
  cluster_down "$tag"; say "$tag done"
}

if has tests; then
  say "GPU tests"
  timeout "$PART_TIMEOUT" $PY -m pytest -q -x tests/engine/test_engine_cuda.py tests/kernels/test_block_copy.py \
    tests/kvtransfer/test_staging.py 2>&1 | tail -5
fi
if has engine; then
  say "engine alone"
  timeout "$PART_TIMEOUT" $H prefill-alone --config "$out/cluster-disagg.yaml" --ckpt "$CKPT" --lengths $TTFT_LENS \
    --out "$out/prefill-alone.json" 2>&1 | grep -v "^WARNING"
fi
# each cluster part in a child bash under `timeout`, so a hang cannot eat the next part's time
export -f say serve_runs run_cluster cluster_down
export t0 out H URL NP RATES LONG CHAT WORKLOADS TTFT_LENS PRESET PART_TIMEOUT SUFFIX
[[ -n $SUFFIX ]] && { has disagg || has coloc; } && mps_start
for c in disagg coloc; do
  has $c || continue
  timeout "$PART_TIMEOUT" bash -c "run_cluster $c" || { say "$c part failed or timed out"; cluster_down "$c$SUFFIX"; }
done
if [[ -n $SUFFIX ]]; then echo quit | nvidia-cuda-mps-control; trap - EXIT; say "MPS server stopped"; fi
if has transfer; then
  say "transfer benchmark"
  timeout "$PART_TIMEOUT" splitserve bench transfer --backend nixl --preset "$PRESET" --device cuda \
    --tokens $TRANSFER_TOKENS --repeats 10 --json "$out/transfer.json" 2>&1 | grep -v "NIXL INFO" | tail -16
fi
$H summary --dir "$out"
say "done"
