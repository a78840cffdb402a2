# Sourced by the bench/run_*_gpu.sh scripts, from the repository root, once $out is set:
#     source bench/gpu_env.sh gpu-NAME.txt
# The GPU image runs the project without installing it: /tmp/ss/splitserve is a folder of links to the
# top-level packages (a link to the whole checkout left there by a hand-run command is replaced), on
# PYTHONPATH; output unbuffered. The GPU, its clocks, the driver, torch and triton go to $out/$1.
mkdir -p "$out"
[ -L /tmp/ss/splitserve ] && rm /tmp/ss/splitserve
mkdir -p /tmp/ss/splitserve
for d in model engine kernels bench tests kvtransfer protos router deploy prefill_worker decode_worker; do
    ln -sfn "$PWD/$d" "/tmp/ss/splitserve/$d"
done
export PYTHONPATH=/tmp/ss${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$out/$1"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/$1"
