"""Routed-expert MoE: token permutation by expert (moe_align) and grouped GEMMs over stacked weights.

Weights as model/moe.py stores them::

    w13  [E, 2 * I, H]   gate rows 0..I-1, then up rows I..2I-1
    w2   [E, H, I]

Routing (from model.moe.Gate): topk_weights [N, k] fp32 (already normalised and scaled),
topk_ids [N, k] int. Flat id f = n * k + j names the (token, slot) pair.

    out[n] = sum_j topk_weights[n, j] * w2[e] @ (silu(w13[e, :I] @ x[n]) * (w13[e, I:] @ x[n])),  e = topk_ids[n, j]

The shared experts' output is the caller's to compute; passed as `shared` it is added in the last kernel.
Triton path: moe_align (one Triton program
for decode-sized batches, torch ops otherwise; no host synchronisation, graph-safe) sorts the flat
ids by expert into blocks of BLOCK_M rows; then
kernel 1 computes gate and up for one block of rows x BLOCK_N columns of both halves and writes
silu(gate) * up; kernel 2 computes the down projection, scales by the routing weight and writes
row f of a [N * k, H] buffer; the k rows of each token are summed in fp32, `shared` added, and the sum
rounded once to x's dtype (one combine kernel).

FP8 variant (`fused_moe_fp8`): e4m3 weights with one fp32 scale per 128x128 block
(`weight_scale_inv` layout: w13_scale [E, 2I/128, H/128], w2_scale [E, H/128, I/128]); activations
are quantised per token per 128 values (act_quant, ue8m0) and each 128-deep K step's dot is scaled
by a_scale * w_scale in fp32 (DeepSeek's fp8_gemm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, interpreting, next_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton
from .fp8_gemm import GemvConfig, _sm_count, gemv_splits
from .quant import act_quant

if HAS_TRITON:
    from .fp8_gemm import quant_group, tile_dot


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loop of model.moe.MoE.forward (routed experts, plus `shared` when given)."""
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    token_of = order // topk_ids.shape[1]
    w_sorted = topk_weights.flatten()[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        tok = token_of[start : start + c]
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * w_sorted[start : start + c, None].to(x.dtype)
        out.index_add_(0, tok, y)
        start += c
    return out if shared is None else out + shared


def quantize_stacked(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] float (R, C multiples of block) -> (e4m3 [E, R, C], fp32 scales [E, R/block, C/block]),
    per-block amax / 448 like model.fp8.quantize_weight, on w's device."""
    e, r, c = w.shape
    if r % block or c % block:
        raise ValueError(f"{tuple(w.shape)}: rows and columns must be multiples of {block}")
    blocks = w.float().view(e, r // block, block, c // block, block)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, :, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(e, r, c), scale


def _dequant_stacked(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, R, C] e4m3 + [E, ceil(R/128), ceil(C/128)] -> [E, R, C] dtype."""
    e, r, c = w.shape
    full = s.repeat_interleave(128, 1)[:, :r].repeat_interleave(128, 2)[:, :, :c]
    return (w.float() * full).to(dtype)


def fused_moe_fp8_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 semantics in plain torch (plus `shared` when given): activations round-tripped through act_quant
    (per 1x128 group, ue8m0), weights dequantised per 128x128 block. Also serves sizes that are not multiples of 128
    (small test presets): gate's and up's scale blocks are then stacked separately
    (w13_scale [E, 2 * ceil(I/128), ceil(H/128)]) and a partial activation group counts as zero-padded."""
    from .fp8_gemm import dequant_weight_ref, quantize_act_ref

    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    ib = -(-inter // 128)
    xd = quantize_act_ref(x)
    for e in range(w13.shape[0]):
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        g = dequant_weight_ref(w13[e, :inter], w13_scale[e, :ib])
        u = dequant_weight_ref(w13[e, inter:], w13_scale[e, ib:])
        w2e = dequant_weight_ref(w2[e], w2_scale[e])
        h = (F.silu(xd[rows] @ g.t()) * (xd[rows] @ u.t())).to(x.dtype)
        y = (quantize_act_ref(h) @ w2e.t()) * topk_weights[rows, slots][:, None].float()
        out.index_add_(0, rows, y.to(x.dtype))
    return out if shared is None else out + shared


# ---------------------------------------------------------------------------------------------
# token permutation
# ---------------------------------------------------------------------------------------------
def moe_align_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flat (token, slot) ids by expert, each expert's run padded to a multiple of block_m.

    Args:
        topk_ids: [N, k] expert id per token and slot.
    Returns:
        sorted_ids [P] int32: flat ids n * k + j grouped by expert; padding rows hold N * k.
        expert_ids [P // block_m] int32: the expert of each block of block_m rows; -1 past the end.
        num_padded [1] int32: rows in use (sum of the padded runs).
    P = roundup(N * k + E * (block_m - 1), block_m) is a static bound, so no host sync is needed.
    """
    flat = topk_ids.flatten().long()
    t = flat.numel()
    dev = flat.device
    p = -(-(t + num_experts * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    sorted_e = flat[order]
    rank = torch.arange(t, device=dev) - (counts.cumsum(0) - counts)[sorted_e]
    dest = (ends - padded)[sorted_e] + rank
    sorted_ids = torch.full((p,), t, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, p, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(expert_ids >= num_experts, -1, expert_ids).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _moe_gate_up_kernel(
        x_ptr,
        w_ptr,
        xs_ptr,
        ws_ptr,
        sorted_ptr,
        eid_ptr,
        npad_ptr,
        h_ptr,
        num_ids,
        inter,
        hidden,
        top_k,
        s_xm,
        s_we,
        s_wn,
        s_wk,
        s_xsm,
        s_wse,
        s_wsn,
        s_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FP8: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(npad_ptr):
            return
        e = tl.load(eid_ptr + pid_m).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ptr + rows)
        rmask = ids < num_ids
        tok = (ids // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * s_xm + offs_k[None, :]
        g_ptrs = w_ptr + e * s_we + offs_n[None, :] * s_wn + offs_k[:, None] * s_wk
        u_ptrs = g_ptrs + inter * s_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=nmask[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=nmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bg = bg.to(tl.float32)
                bu = bu.to(tl.float32)
            if FP8:  # one 128-deep block: scale each partial product (BLOCK_K == 128, BLOCK_N <= 128)
                kb = k0 // BLOCK_K
                a_s = tl.load(xs_ptr + tok * s_xsm + kb, mask=rmask, other=0.0)
                sg = tl.load(ws_ptr + e * s_wse + ((pid_n * BLOCK_N) // 128) * s_wsn + kb)
                su = tl.load(ws_ptr + e * s_wse + ((inter + pid_n * BLOCK_N) // 128) * s_wsn + kb)
                acc_g += tl.dot(a, bg) * (a_s[:, None] * sg)
                acc_u += tl.dot(a, bu) * (a_s[:, None] * su)
            elif IEEE:
                acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
                acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, bg, acc_g)
                acc_u = tl.dot(a, bu, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * s_wk
            u_ptrs += BLOCK_K * s_wk
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(
            h_ptr + rows[:, None].to(tl.int64) * s_hm + offs_n[None, :],
            h.to(h_ptr.dtype.element_ty),
            mask=rmask[:, None] & nmask[None, :],
        )

    @triton.jit
    def _moe_down_kernel(
        h_ptr,
        w_ptr,
        hs_ptr,
        ws_ptr,
        sorted_ptr,
        eid_ptr,
        npad_ptr,
        tw_ptr,
        y_ptr,
        num_ids,
        hidden,
        inter,
        s_hm,
        s_we,
        s_wn,
        s_wk,
        s_hsm,
        s_wse,
        s_wsn,
        s_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FP8: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(npad_ptr):
            return
        e = tl.load(eid_ptr + pid_m).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ptr + rows)
        rmask = ids < num_ids
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + rows[:, None].to(tl.int64) * s_hm + offs_k[None, :]
        b_ptrs = w_ptr + e * s_we + offs_n[None, :] * s_wn + offs_k[:, None] * s_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if FP8:
                kb = k0 // BLOCK_K
                a_s = tl.load(hs_ptr + rows.to(tl.int64) * s_hsm + kb, mask=rmask, other=0.0)
                sb = tl.load(ws_ptr + e * s_wse + ((pid_n * BLOCK_N) // 128) * s_wsn + kb)
                acc += tl.dot(a, b) * (a_s[:, None] * sb)
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * s_wk
        acc = acc * tl.load(tw_ptr + ids, mask=rmask, other=0.0)[:, None]
        tl.store(
            y_ptr + ids[:, None].to(tl.int64) * s_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=rmask[:, None] & nmask[None, :],
        )

    @triton.jit
    def _moe_align_kernel(
        ids_ptr,
        sorted_ptr,
        eid_ptr,
        npad_ptr,
        num_ids,
        num_rows,
        num_blocks,
        E: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
        NB: tl.constexpr,
        BM: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """moe_align in one program (small batches): counts, padded offsets and stable ranks from a
        [tokens x experts] one-hot, then the scatter. Same output as the torch version."""
        pdl_start(PDL)
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < num_ids
        ids = tl.load(ids_ptr + offs_t, mask=tmask, other=-1).to(tl.int32)
        offs_e = tl.arange(0, BLOCK_E)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [T, E]
        counts = tl.sum(onehot, axis=0)
        padded = (counts + BM - 1) // BM * BM
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        rank = tl.cumsum(onehot, axis=0) - onehot
        dest = tl.sum((rank + starts[None, :]) * onehot, axis=1)
        for p0 in range(0, num_rows, BLOCK_T):
            tl.store(sorted_ptr + p0 + offs_t, tl.full([BLOCK_T], 0, tl.int32) + num_ids, mask=p0 + offs_t < num_rows)
        tl.debug_barrier()
        tl.store(sorted_ptr + dest, offs_t, mask=tmask)
        offs_b = tl.arange(0, NB)
        bstart = offs_b * BM
        real_e = offs_e < E
        eid = tl.sum(((bstart[:, None] >= ends[None, :]) & real_e[None, :]).to(tl.int32), axis=1)
        eid = tl.where(eid >= E, -1, eid)
        tl.store(eid_ptr + offs_b, eid, mask=offs_b < num_blocks)
        tl.store(npad_ptr, tl.max(ends, axis=0))


def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align as one Triton program; for small batches (tokens * k * experts <= 65536)."""
    require_triton()
    flat = topk_ids.reshape(-1)
    t = flat.numel()
    p = -(-(t + num_experts * (block_m - 1)) // block_m) * block_m
    block_t, block_e = next_pow2(max(t, 16)), next_pow2(max(num_experts, 16))
    if block_t * block_e > 65536:
        raise ValueError(f"{t} ids x {num_experts} experts is too large for the one-program moe_align")
    sorted_ids = torch.empty(p, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(p // block_m, dtype=torch.int32, device=flat.device)
    npad = torch.empty(1, dtype=torch.int32, device=flat.device)
    _moe_align_kernel[(1,)](
        flat,
        sorted_ids,
        expert_ids,
        npad,
        t,
        p,
        p // block_m,
        E=num_experts,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        NB=next_pow2(p // block_m),
        BM=block_m,
        num_warps=8 if block_t * block_e > 8192 else 4,
        **pdl(_moe_align_kernel, flat),
    )
    return sorted_ids, expert_ids, npad


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token permutation by expert (contract in moe_align_ref). On CUDA with small batches
    (tokens * k * experts <= 65536 after rounding to powers of two) one Triton program does it
    (6-9 us in a CUDA graph on an H100 vs 59-88 us for the torch ops, whose stable argsort dominates);
    otherwise the torch ops run (also graph-safe)."""
    fits = next_pow2(max(topk_ids.numel(), 16)) * next_pow2(max(num_experts, 16)) <= 65536
    if use_triton(topk_ids) and fits:
        return moe_align_triton(topk_ids, num_experts, block_m)
    return moe_align_ref(topk_ids, num_experts, block_m)


def _block_k(k: int) -> int:
    for bk in (128, 64, 32, 16):
        if k % bk == 0:
            return bk
    raise ValueError(f"hidden and intermediate sizes must be multiples of 16, got {k}")


#: (token, expert) pairs per expert from which the grouped GEMMs take 128x128 tiles: each expert's weights are
#: then read once per 128 rows instead of once per 64 (was 512, prefill only; at batch 256 of the bench preset,
#: 128 rows per expert, the 64-row tiles read the weights twice: MoE 2.17 ms of a 6.9 ms step on an H100,
#: bench/results/decode-h100-r3)
LARGE_TILES_PER_EXPERT = 64


def _block_m(num_ids: int, num_experts: int) -> int:
    per_expert = num_ids / max(1, num_experts)
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def _fused_moe_triton(
    x,
    w13,
    w2,
    topk_weights,
    topk_ids,
    fp8_scales=None,
    block_m=None,
    block_n=64,
    num_warps=4,
    num_stages=4,
    block_k=None,
    shared=None,
):
    require_triton()
    _check_shared(shared, x)
    n, hidden = x.shape
    e, two_i, hid_w = w13.shape
    inter = two_i // 2
    if hid_w != hidden or w2.shape != (e, hidden, inter):
        raise ValueError(
            f"w13 must be [E, 2I, {hidden}] and w2 [E, {hidden}, I]; got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("w13 and w2 need a contiguous last dimension")
    top_k = topk_ids.shape[1]
    num_ids = n * top_k
    fp8 = fp8_scales is not None
    if block_m is None and x.dtype != torch.float32 and num_ids >= LARGE_TILES_PER_EXPERT * e:
        # 128x128 tiles, 8 warps, from 64 rows per expert on average (H100 sweep at 8192 tokens: 13.4 ms vs
        # 23.2 ms for the decode tiles, 62% of the bf16 matmul rate, bench/results/sweep-kernels-h100.json;
        # at 256 tokens x 8 of 16 experts see LARGE_TILES_PER_EXPERT); the FP8 kernels take the same tiles
        # (their K step is the 128-deep scale block)
        block_m, block_n, block_k, num_warps, num_stages = 128, 128, block_k or 64, 8, 3
    bm = block_m or _block_m(num_ids, e)
    if fp8:
        bk1 = bk2 = 128
        block_n = min(block_n, 128)
        if hidden % 128 or inter % 128 or 128 % block_n:
            raise ValueError("the FP8 path needs hidden and intermediate sizes that are multiples of 128")
        w13_s, w2_s = fp8_scales
        xq, xs = act_quant(x)
    else:
        bk1, bk2 = _block_k(hidden), _block_k(inter)
        if block_k:
            bk1, bk2 = min(bk1, block_k), min(bk2, block_k)
        if x.dtype == torch.float32:  # fp32 tiles are twice as large: keep the stages in shared memory
            bk1, bk2, num_stages = min(bk1, 32), min(bk2, 32), min(num_stages, 3)
        xq, xs = x.contiguous(), x
        w13_s = w2_s = x
    sorted_ids, expert_ids, npad = moe_align(topk_ids, e, bm)
    p = sorted_ids.numel()
    h = torch.empty(p, inter, device=x.device, dtype=x.dtype)
    tw = topk_weights.reshape(-1).float().contiguous()
    k1, k2 = _moe_gate_up_kernel, _moe_down_kernel
    up = interpreting(k1)
    k1[(p // bm, triton.cdiv(inter, block_n))](
        xq,
        w13,
        xs,
        w13_s,
        sorted_ids,
        expert_ids,
        npad,
        h,
        num_ids,
        inter,
        hidden,
        top_k,
        xq.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        xs.stride(0) if fp8 else 0,
        w13_s.stride(0) if fp8 else 0,
        w13_s.stride(1) if fp8 else 0,
        h.stride(0),
        BLOCK_M=bm,
        BLOCK_N=block_n,
        BLOCK_K=bk1,
        FP8=fp8,
        UPCAST=up,
        IEEE=x.dtype == torch.float32 and not fp8,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl(k1, xq),
    )
    if fp8:
        hq, hs = act_quant(h)
    else:
        hq, hs = h, h
    y = torch.empty(num_ids, hidden, device=x.device, dtype=x.dtype)
    k2[(p // bm, triton.cdiv(hidden, block_n))](
        hq,
        w2,
        hs,
        w2_s,
        sorted_ids,
        expert_ids,
        npad,
        tw,
        y,
        num_ids,
        hidden,
        inter,
        hq.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        hs.stride(0) if fp8 else 0,
        w2_s.stride(0) if fp8 else 0,
        w2_s.stride(1) if fp8 else 0,
        y.stride(0),
        BLOCK_M=bm,
        BLOCK_N=block_n,
        BLOCK_K=bk2,
        FP8=fp8,
        UPCAST=up,
        IEEE=x.dtype == torch.float32 and not fp8,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl(k2, hq),
    )
    return _combine(y, 0, 1, n, top_k, x.dtype, shared)


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, **config
) -> torch.Tensor:
    return _fused_moe_triton(x, w13, w2, topk_weights, topk_ids, None, **config)


def fused_moe_fp8_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    **config,
) -> torch.Tensor:
    return _fused_moe_triton(x, w13, w2, topk_weights, topk_ids, (w13_scale, w2_scale), **config)


# ---------------------------------------------------------------------------------------------
# FP8 experts at decode sizes: each active expert's weights streamed once
# ---------------------------------------------------------------------------------------------
# With N <= MOE_GEMV_MAX_N tokens, an expert gets at most N rows, so moe_align with block_m >= N
# gives every active expert exactly one block: the grid is (blocks, column tiles, K splits) and each
# expert's e4m3 w13 and w2 are read once, by programs that stream them like the dense GEMV
# (kernels/fp8_gemm.py, "small M"): [BLOCK_N, 128] weight tiles with their block scale, the block's
# token rows gathered and act_quant-ed per 1x128 group in registers (no act_quant launches; same
# contract as fused_moe_fp8_ref), the dot as CUDA-core FMAs (block_m <= 4) or one swap-AB MMA.
# gate and up are one pass over the same rows (gate row r and up row I + r in the same program);
# with K split, the fp32 gate/up partials are summed and silu(gate) * up written by one small
# kernel. down writes each (token, slot)'s fp32 row scaled by its routing weight, and one last
# kernel sums the slots (and splits) of each token into x's dtype. Launches: moe_align, gate/up,
# [silu-sum], down, combine; inactive blocks (moe_align's static bound) return at once.

# by token-count class (largest N of the class); same fields as fp8_gemm.GemvConfig. Measured by
# bench/fp8_sweep.py ("moe table row" lines of `bash bench/run_fp8_gpu.sh OUT sweep`): H200, 2026-12-02,
# bench/results/fp8-h200/fp8-sweep-run1.log. No row above 16 tokens: at 64 the tuned decode path took
# 294 us against the grouped-GEMM tiles' 269 us (all 16 experts busy, 32 rows each), so the tiles serve it.
MOE_GEMV_TABLE: dict[int, GemvConfig] = {
    1: GemvConfig(block_n=64, ctas_per_sm=4, num_warps=8, num_stages=4, dot=True, prequant=False),
    4: GemvConfig(block_n=64, ctas_per_sm=4, num_warps=4, num_stages=4, dot=True, prequant=False),
    16: GemvConfig(block_n=64, ctas_per_sm=2, num_warps=4, num_stages=4, dot=True, prequant=False),
}
MOE_GEMV_MAX_N = max(MOE_GEMV_TABLE)  # fused_moe_fp8 sends N <= this many tokens here (read at every call)


def moe_gemv_class(n: int) -> int:
    for c in sorted(MOE_GEMV_TABLE):
        if n <= c:
            return c
    raise ValueError(f"{n} tokens is above MOE_GEMV_MAX_N={MOE_GEMV_MAX_N}")


if HAS_TRITON:

    @triton.jit
    def _moe_gemv_gate_up_kernel(
        x_ptr,
        xs_ptr,
        w_ptr,
        ws_ptr,
        sorted_ptr,
        eid_ptr,
        npad_ptr,
        out_ptr,
        num_ids,
        inter,
        hidden,
        top_k,
        k_per_split,
        s_xm,
        s_xsm,
        s_we,
        s_wn,
        s_wse,
        s_wsn,
        s_os,
        s_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISE: tl.constexpr,
        PARTIAL: tl.constexpr,
        PREQUANT: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        if pid_b * BLOCK_M >= tl.load(npad_ptr):
            return
        e = tl.load(eid_ptr + pid_b).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        rows = pid_b * BLOCK_M + offs_m
        ids = tl.load(sorted_ptr + rows)
        rmask = ids < num_ids
        tok = (ids // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < inter
        offs_g = tl.arange(0, 128)
        g_ptrs = w_ptr + e * s_we + offs_n.to(tl.int64)[:, None] * s_wn + offs_g[None, :]
        u_ptrs = g_ptrs + inter * s_wn
        x_ptrs = x_ptr + tok[:, None] * s_xm + offs_g[None, :]
        sg_row = ws_ptr + e * s_wse + ((pid_n * BLOCK_N) // 128) * s_wsn
        su_row = ws_ptr + e * s_wse + ((inter + pid_n * BLOCK_N) // 128) * s_wsn
        acc_g = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, hidden)
        for k0 in range(k_lo, k_hi, 128):
            g = tl.load(g_ptrs + k0, mask=nmask[:, None], other=0.0)
            u = tl.load(u_ptrs + k0, mask=nmask[:, None], other=0.0)
            a = tl.load(x_ptrs + k0, mask=rmask[:, None], other=0.0).to(tl.float32)
            sg = tl.load(sg_row + k0 // 128)
            su = tl.load(su_row + k0 // 128)
            if PREQUANT:  # x holds act_quant's e4m3 values, xs its scales
                q = a
                sa = tl.load(xs_ptr + tok * s_xsm + k0 // 128, mask=rmask, other=0.0)
            else:
                q, sa = quant_group(a, UPCAST)
            acc_g += tile_dot(g, q, offs_m, BLOCK_N, BLOCK_M, DOT, UPCAST, PRECISE) * (sa[None, :] * sg)
            acc_u += tile_dot(u, q, offs_m, BLOCK_N, BLOCK_M, DOT, UPCAST, PRECISE) * (sa[None, :] * su)
        smask = nmask[:, None] & rmask[None, :]
        o_ptrs = out_ptr + rows.to(tl.int64)[None, :] * s_om + offs_n[:, None]
        if PARTIAL:  # fp32 partial sums of this K split: gate in columns [0, I), up in [I, 2I)
            tl.store(o_ptrs + pid_s * s_os, acc_g, mask=smask)
            tl.store(o_ptrs + pid_s * s_os + inter, acc_u, mask=smask)
        else:
            h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
            tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=smask)

    @triton.jit
    def _moe_silu_sum_kernel(
        p_ptr,
        h_ptr,
        npad_ptr,
        inter,
        s_ps,
        s_pm,
        s_hm,
        SPLITS: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """h[r] = silu(sum_s gate partial) * (sum_s up partial) for row r of the sorted buffer."""
        pdl_start(PDL)
        r = tl.program_id(0)
        if r >= tl.load(npad_ptr):
            return
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        base = p_ptr + r.to(tl.int64) * s_pm + offs
        g = tl.zeros([BLOCK], tl.float32)
        u = tl.zeros([BLOCK], tl.float32)
        for sp in tl.static_range(SPLITS):
            g += tl.load(base + sp * s_ps, mask=mask, other=0.0)
            u += tl.load(base + sp * s_ps + inter, mask=mask, other=0.0)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + r.to(tl.int64) * s_hm + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _moe_gemv_down_kernel(
        h_ptr,
        hs_ptr,
        w_ptr,
        ws_ptr,
        sorted_ptr,
        eid_ptr,
        npad_ptr,
        tw_ptr,
        y_ptr,
        num_ids,
        hidden,
        inter,
        k_per_split,
        s_hm,
        s_hsm,
        s_we,
        s_wn,
        s_wse,
        s_wsn,
        s_ys,
        s_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISE: tl.constexpr,
        PREQUANT: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        if pid_b * BLOCK_M >= tl.load(npad_ptr):
            return
        e = tl.load(eid_ptr + pid_b).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        rows = pid_b * BLOCK_M + offs_m
        ids = tl.load(sorted_ptr + rows)
        rmask = ids < num_ids
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < hidden
        offs_g = tl.arange(0, 128)
        w_ptrs = w_ptr + e * s_we + offs_n.to(tl.int64)[:, None] * s_wn + offs_g[None, :]
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * s_hm + offs_g[None, :]
        s_row = ws_ptr + e * s_wse + ((pid_n * BLOCK_N) // 128) * s_wsn
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, inter)
        for k0 in range(k_lo, k_hi, 128):
            w = tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
            a = tl.load(h_ptrs + k0, mask=rmask[:, None], other=0.0).to(tl.float32)
            sw = tl.load(s_row + k0 // 128)
            if PREQUANT:
                q = a
                sa = tl.load(hs_ptr + rows.to(tl.int64) * s_hsm + k0 // 128, mask=rmask, other=0.0)
            else:
                q, sa = quant_group(a, UPCAST)
            acc += tile_dot(w, q, offs_m, BLOCK_N, BLOCK_M, DOT, UPCAST, PRECISE) * (sa[None, :] * sw)
        acc = acc * tl.load(tw_ptr + ids, mask=rmask, other=0.0)[None, :]
        tl.store(
            y_ptr + pid_s * s_ys + ids.to(tl.int64)[None, :] * s_ym + offs_n[:, None],
            acc,
            mask=nmask[:, None] & rmask[None, :],
        )

    @triton.jit
    def _moe_combine_kernel(
        y_ptr,
        out_ptr,
        hidden,
        top_k,
        s_ys,
        s_ym,
        s_om,
        a_ptr,
        s_am,
        SPLITS: tl.constexpr,
        BLOCK: tl.constexpr,
        ADD: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """out[t] = sum over splits s and slots j of y[s, t * top_k + j] (fp32) [+ a[t], the shared experts'
        output, with ADD], rounded once to out's dtype."""
        pdl_start(PDL)
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < hidden
        acc = tl.zeros([BLOCK], tl.float32)
        for j in range(0, top_k):
            row = y_ptr + (t * top_k + j).to(tl.int64) * s_ym + offs
            for sp in tl.static_range(SPLITS):
                acc += tl.load(row + sp * s_ys, mask=mask, other=0.0)
        if ADD:
            acc += tl.load(a_ptr + t.to(tl.int64) * s_am + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * s_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_shared(shared: torch.Tensor | None, x: torch.Tensor) -> None:
    """`shared` (the shared experts' output) must be x-shaped, on x's device, rows contiguous: checked before any
    launch (a refusal inside a CUDA-graph capture would invalidate it)."""
    if shared is not None and (shared.shape != x.shape or shared.device != x.device or shared.stride(-1) != 1):
        raise ValueError(
            f"shared must be [{x.shape[0]}, {x.shape[1]}] on {x.device} with a contiguous last dimension, "
            f"got {tuple(shared.shape)} on {shared.device}"
        )


def _combine(y: torch.Tensor, s_ys: int, splits: int, n: int, top_k: int, dtype, shared) -> torch.Tensor:
    """The MoE's last kernel: each token's weighted slot rows (y [.., n * top_k, H], fp32 or x's dtype, `splits`
    partials s_ys apart) summed, plus the shared experts' output when given, into [n, H] of `dtype`."""
    hidden = y.shape[-1]
    out = torch.empty(n, hidden, device=y.device, dtype=dtype)
    _moe_combine_kernel[(n, triton.cdiv(hidden, 1024))](
        y,
        out,
        hidden,
        top_k,
        s_ys,
        y.stride(-2),
        out.stride(0),
        out if shared is None else shared,
        0 if shared is None else shared.stride(0),
        SPLITS=splits,
        BLOCK=1024,
        ADD=shared is not None,
        num_warps=4,
        **pdl(_moe_combine_kernel, y),
    )
    return out


def fused_moe_fp8_gemv_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    block_n: int | None = None,
    splits: int | None = None,
    down_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    dot: bool | None = None,
    prequant: bool | None = None,
    precise: bool = False,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decode-size FP8 MoE (N <= MOE_GEMV_MAX_N tokens; contract of fused_moe_fp8_ref, H and I
    multiples of 128); keyword arguments override MOE_GEMV_TABLE's choice (tests, bench/fp8_sweep.py)."""
    require_triton()
    _check_shared(shared, x)
    n, hidden = x.shape
    e, two_i, hid_w = w13.shape
    inter = two_i // 2
    if hid_w != hidden or w2.shape != (e, hidden, inter):
        raise ValueError(
            f"w13 must be [E, 2I, {hidden}] and w2 [E, {hidden}, I]; got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    if hidden % 128 or inter % 128:
        raise ValueError(f"the FP8 decode MoE needs H and I multiples of 128, got H={hidden}, I={inter}")
    if n > MOE_GEMV_MAX_N:
        raise ValueError(f"the FP8 decode MoE serves <= MOE_GEMV_MAX_N = {MOE_GEMV_MAX_N} tokens, got {n}")
    if w13.stride(2) != 1 or w2.stride(2) != 1 or w13_scale.stride(2) != 1 or w2_scale.stride(2) != 1:
        raise ValueError("w13, w2 and their scales need a contiguous last dimension")
    top_k = topk_ids.shape[1]
    num_ids = n * top_k
    cfg = MOE_GEMV_TABLE[moe_gemv_class(n)]
    bn = int(block_n or cfg.block_n)
    if bn not in (16, 32, 64, 128):
        raise ValueError(f"block_n must be 16, 32, 64 or 128 (inside one scale block), got {bn}")
    use_dot = cfg.dot if dot is None else bool(dot)
    pre = cfg.prequant if prequant is None else bool(prequant)
    bm = max(16, next_pow2(n)) if use_dot else next_pow2(n)  # >= the tokens any one expert gets
    nw, ns = int(num_warps or cfg.num_warps), int(num_stages or cfg.num_stages)
    sms = _sm_count(x.device)
    active = min(e, num_ids)  # experts that can be busy
    sp1 = int(splits) if splits is not None else gemv_splits(active * inter, hidden, bm, bn, cfg.ctas_per_sm, sms)
    sp2 = (
        int(down_splits)
        if down_splits is not None
        else gemv_splits(active * hidden, inter, bm, bn, cfg.ctas_per_sm, sms)
    )
    per1 = -(-(hidden // 128) // max(1, sp1)) * 128
    ns1 = -(-hidden // per1)
    per2 = -(-(inter // 128) // max(1, sp2)) * 128
    ns2 = -(-inter // per2)
    xc = x if x.stride(1) == 1 else x.contiguous()
    xq, xs = act_quant(xc) if pre else (xc, xc)
    sorted_ids, expert_ids, npad = moe_align(topk_ids, e, bm)
    p = sorted_ids.numel()
    blocks = p // bm
    up = interpreting(_moe_gemv_gate_up_kernel)
    h = torch.empty(p, inter, device=x.device, dtype=x.dtype)
    if ns1 > 1:
        part = torch.empty(ns1, p, two_i, device=x.device, dtype=torch.float32)
        out1, s_os, s_om = part, part.stride(0), part.stride(1)
    else:
        out1, s_os, s_om = h, 0, h.stride(0)
    _moe_gemv_gate_up_kernel[(blocks, triton.cdiv(inter, bn), ns1)](
        xq,
        xs,
        w13,
        w13_scale,
        sorted_ids,
        expert_ids,
        npad,
        out1,
        num_ids,
        inter,
        hidden,
        top_k,
        per1,
        xq.stride(0),
        xs.stride(0) if pre else 0,
        w13.stride(0),
        w13.stride(1),
        w13_scale.stride(0),
        w13_scale.stride(1),
        s_os,
        s_om,
        BLOCK_M=bm,
        BLOCK_N=bn,
        DOT=use_dot,
        UPCAST=up,
        PRECISE=bool(precise),
        PARTIAL=ns1 > 1,
        PREQUANT=pre,
        num_warps=nw,
        num_stages=ns,
        **pdl(_moe_gemv_gate_up_kernel, xq),
    )
    if ns1 > 1:
        _moe_silu_sum_kernel[(p, triton.cdiv(inter, 1024))](
            part,
            h,
            npad,
            inter,
            part.stride(0),
            part.stride(1),
            h.stride(0),
            SPLITS=ns1,
            BLOCK=1024,
            num_warps=4,
            **pdl(_moe_silu_sum_kernel, part),
        )
    y = torch.empty(ns2, num_ids, hidden, device=x.device, dtype=torch.float32)
    tw = topk_weights.reshape(-1).float().contiguous()
    hq, hs = act_quant(h) if pre else (h, h)
    _moe_gemv_down_kernel[(blocks, triton.cdiv(hidden, bn), ns2)](
        hq,
        hs,
        w2,
        w2_scale,
        sorted_ids,
        expert_ids,
        npad,
        tw,
        y,
        num_ids,
        hidden,
        inter,
        per2,
        hq.stride(0),
        hs.stride(0) if pre else 0,
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0),
        w2_scale.stride(1),
        y.stride(0),
        y.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        DOT=use_dot,
        UPCAST=up,
        PRECISE=bool(precise),
        PREQUANT=pre,
        num_warps=nw,
        num_stages=ns,
        **pdl(_moe_gemv_down_kernel, hq),
    )
    return _combine(y, y.stride(0), ns2, n, top_k, x.dtype, shared)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer (bf16 grouped GEMMs), combined with the routing weights.

    Args:
        x: [N, H] tokens (bf16).
        w13: [E, 2I, H] stacked gate ‖ up weights; w2: [E, H, I] stacked down weights.
        topk_weights: [N, k] fp32 routing weights; topk_ids: [N, k] int expert ids.
        shared: [N, H] in x's dtype or None: the shared experts' output, added in the combining kernel
            (on CUDA: to the fp32 sum, one rounding; no separate add kernel).
    Returns:
        [N, H] in x's dtype: the routed experts' sum (+ shared).
    """
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, shared=shared)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, shared)


def fused_moe_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """fused_moe with float8_e4m3fn weights and 128x128 block scales (checkpoint `weight_scale_inv`
    stacked per expert: w13_scale [E, 2I/128, H/128], w2_scale [E, H/128, I/128]); activations are
    quantised per 128 values (ue8m0) inside. The Triton kernels serve H and I that are multiples of
    128 (DeepSeek's); other sizes (small test presets) run the reference. Up to MOE_GEMV_MAX_N tokens
    the decode kernels (each active expert streamed once), above them the grouped-GEMM tiles."""
    fits = x.shape[1] % 128 == 0 and w2.shape[2] % 128 == 0
    if not (use_triton(x) and fits):
        return fused_moe_fp8_ref(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, shared)
    fn = fused_moe_fp8_gemv_triton if x.shape[0] <= MOE_GEMV_MAX_N else fused_moe_fp8_triton
    return fn(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, shared=shared)
