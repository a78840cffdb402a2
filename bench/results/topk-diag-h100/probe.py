"""The reg top-k kernel on the engine call topk_diag --engine caught (engine_first_bad.pt, beside this file):
which digit widths / warps / specialisations reproduce the unwritten slots. From the repository root on a GPU:
    python3 bench/results/topk-diag-h100/probe.py
"""

from pathlib import Path

import torch
import triton

from splitserve.bench.topk import exact_ref as order_ref  # the documented output, written plainly
from splitserve.kernels import radix_topk as T
from splitserve.kernels._common import next_pow2

d = torch.load(Path(__file__).with_name("engine_first_bad.pt"))
x, k = d["logits"].cuda().float(), d["k"]
ref = order_ref(x, k).cpu()
for bits in (5, 6, 7, 8):
    for w in (4, 8, 16):
        out = T.topk_triton_reg(x, k, num_warps=w, bits=bits).cpu()
        bad = (out != ref).any(1).nonzero().flatten().tolist()
        print(f"bits {bits} warps {w}: bad rows {len(bad)} {bad[:6]}", flush=True)
out = T.topk_triton(x, k).cpu()
print("stream bad rows", (out != ref).any(1).sum().item())
xs = x[:, :300].contiguous()  # width not a multiple of 16
out = T.topk_triton_reg(xs, k).cpu()
print("width 300 bad rows", (out != order_ref(xs, k).cpu()).any(1).sum().item())
K2 = triton.jit(T._topk_reg_kernel.fn, do_not_specialize=["width", "s_x", "s_o"])
o2 = torch.empty(x.shape[0], k, device="cuda", dtype=torch.int32)
K2[(x.shape[0],)](
    x,
    o2,
    x.shape[1],
    x.stride(0),
    o2.stride(0),
    K=k,
    BLOCK=max(16, next_pow2(x.shape[1])),
    OBLOCK=min(2048, next_pow2(k)),
    BITS=6,
    num_warps=T.reg_warps(x.shape[1]),
)
print("no-specialize bad rows", (o2.cpu() != ref).any(1).sum().item())
