"""x · W^T with fp32 weights and fp32 results for bf16 activations: the MoE router's gate GEMM and the
lightning indexer's head-weight projection, which DeepSeek computes in fp32 (F.linear(x.float(), W.float())).

    x [M, K] bf16, w [N, K] fp32  ->  [M, N] fp32

cuBLAS has no bf16 x fp32 product: the torch composition converts x to fp32 (a copy kernel) and runs an fp32
SIMT GEMM, at decode sizes a cutlass sgemm and a split-K reduction (or a GEMV and a reduction): three kernels
and ~12 us per call at batch 64 on an H100 for the router's 7.3 MB, whose bytes take 2.4 us
(bench/results/sparse-mla-ws-h100/engine.log: 83 us of fp32 GEMMs and ~40 us of conversions per step).

The kernel runs the product on the tensor cores at fp32 precision. Every fp32 weight is the exact sum of three
bf16 numbers: hi = bf16(w), mid = bf16(w - hi), lo = bf16(w - hi - mid) (each difference is exact in fp32 and
the three pieces hold 8 + 8 + 8 of fp32's 24 significant bits; weights below ~1e-33, where the last piece would be
subnormal, lose bits there). A bf16 activation is itself exact, each bf16 x bf16 product is exact in fp32, and
three bf16 MMAs accumulate them in fp32, into a fresh accumulator each K step that an fp32 add then takes into
the running sum: the result differs from an fp32 GEMM by summation order and the tensor cores' accumulation
rounding within one step, i.e. at fp32's own rounding level. One program owns a BM x BN tile of the output
over one K range. At decode sizes (one M tile: each weight read once) the K dimension is split over enough
programs to fill the GPU (about 264) and a second kernel sums the partials in a fixed order: deterministic for a
given number of rows (the plan depends on it, so results are not batch-invariant; cuBLAS's were not either).
Up to GEMV_MAX_ROWS rows (the decode step at batch 1) a GEMV kernel serves instead: one program an output, the
whole K in fp32 FMAs on the CUDA cores, one launch (the split-K pair is two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._common import (
    HAS_TRITON,
    interpreting,
    next_pow2,
    pdl,
    pdl_start,
    require_triton,
    splitk_sum,
    tl,
    triton,
    use_triton,
)


def fp32_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), w.float())


if HAS_TRITON:

    @triton.jit
    def _fp32_linear_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_os,  # between the split partials (0 with one split)
        stride_om,
        K_SPLIT,  # K per split program, a multiple of BK
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        UPCAST: tl.constexpr,  # the interpreter's tl.dot takes fp32 operands only (_common.interpreting)
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_start = pid_s * K_SPLIT
        for kk in range(0, K_SPLIT, BK):
            k = k_start + kk + rk
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN] = W^T
            hi = w.to(tl.bfloat16)
            rest = w - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            if UPCAST:
                x, hi, mid, lo = x.to(tl.float32), hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
            # this K step's three products summed on the tensor cores, smallest first, then added to the running
            # sum in an fp32 add: the tensor cores' accumulation is coarser than an IEEE add, which over a whole K
            # of 7168 (112 steps x 3 MMAs into one accumulator) drifted to 2^-18.9 of sum |x| |w| on an H100; a fresh
            # accumulator per step bounds that to one step's terms (DeepSeek promotes FP8 MMA sums the same way)
            step = tl.dot(x, lo, tl.zeros((BM, BN), dtype=tl.float32))
            step = tl.dot(x, mid, step)
            acc += tl.dot(x, hi, step)
        out = out_ptr + pid_s.to(tl.int64) * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fp32_gemv_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        M,
        stride_xm,
        stride_wn,
        stride_om,
        K: tl.constexpr,
        BM: tl.constexpr,
        BK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """out[m, n] for the few rows m < M (BM >= M) and one output n over the whole K, in CUDA-core fp32 FMAs
        (IEEE, like an fp32 GEMM): one launch, no partials to sum. K is unrolled, so every load of the weight
        row can be in flight at once (the program's time is about one memory latency, not K / BK of them)."""
        pdl_start(PDL)
        n = tl.program_id(0).to(tl.int64)
        rm = tl.arange(0, BM)
        m_ok = rm < M
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            k = k0 + rk
            k_ok = k < K
            w = tl.load(w_ptr + n * stride_wn + k, mask=k_ok, other=0.0)
            x = tl.load(
                x_ptr + rm.to(tl.int64)[:, None] * stride_xm + k[None, :],
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc += x.to(tl.float32) * w[None, :]
        tl.store(out_ptr + rm.to(tl.int64) * stride_om + n, tl.sum(acc, axis=1), mask=m_ok)


#: programs a call aims for (two per SM of an H100 / H200): the K split fills the GPU at decode sizes
TARGET_PROGRAMS = 264
#: up to this many rows the GEMV kernel serves a call (one program an output, no K split and so no second
#: launch summing partials; the decode step at batch 1 runs 7 of these calls)
GEMV_MAX_ROWS = 4
#: and K up to this (its K loop is unrolled: one compiled kernel per K, each step in the code). Compiled for
#: sm_90 at 4 rows: no spills at K 8192 (DeepSeek's hidden is 7168), 308 bytes spilled at 12288
GEMV_MAX_K = 8192


def plan(m: int, n: int, k: int, bk: int = 64) -> tuple[int, int, int, int]:
    """(BM, BN, splits, K per split) for an [m, k] x [k, n] product: 16-row tiles for a few rows, narrow
    output tiles at decode sizes (each program then reads a thin slice of the weights), and the K dimension
    split until about TARGET_PROGRAMS programs run, each with at least two BK steps."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 16 if m <= 16 else (32 if m <= 64 else 64)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    steps = triton.cdiv(k, bk)
    splits = max(1, min(TARGET_PROGRAMS // tiles, steps // 2))  # no split once the tiles alone fill the GPU
    k_split = triton.cdiv(steps, splits) * bk
    return bm, bn, triton.cdiv(k, k_split), k_split


def fp32_linear_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    require_triton()
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp32_linear takes x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != torch.bfloat16 or w.dtype != torch.float32:
        raise ValueError(f"fp32_linear takes bf16 x and fp32 w, got {x.dtype} and {w.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if m <= GEMV_MAX_ROWS and k <= GEMV_MAX_K:
        _fp32_gemv_kernel[(n,)](
            x,
            w,
            out,
            m,
            x.stride(0),
            w.stride(0),
            out.stride(0),
            K=k,
            BM=next_pow2(m),
            BK=1024,
            num_warps=4,
            **pdl(_fp32_gemv_kernel, x),
        )
        return out
    bk = 64
    bm, bn, splits, k_split = plan(m, n, k, bk)
    part = out if splits == 1 else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
    _fp32_linear_kernel[grid](
        x,
        w,
        part,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        m * n if splits > 1 else 0,
        n,
        k_split,
        BM=bm,
        BN=bn,
        BK=bk,
        UPCAST=interpreting(_fp32_linear_kernel),
        num_warps=8 if bm == 64 else 4,  # 64 x 64 at 4 warps spills (two accumulators: the kernel's K-step comment)
        num_stages=4,
        **pdl(_fp32_linear_kernel, x),
    )
    if splits > 1:  # blocks of at most 8192 partials (splits x block) a program
        splitk_sum(part, out, max(32, min(1024, 8192 // next_pow2(splits))))
    return out


def fp32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] x w [N, K] fp32 -> [..., N] fp32 at fp32 precision (module docstring): the Triton kernel for
    bf16 x on CUDA when no gradient is recorded (behind _common.GLUE_KERNELS), F.linear(x.float(), w.float()) otherwise."""
    triton_ok = (
        _common.GLUE_KERNELS
        and use_triton(x)
        and x.dtype == torch.bfloat16
        and w.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )
    if not triton_ok:
        return fp32_linear_ref(x, w)
    lead = x.shape[:-1]
    return fp32_linear_triton(x.reshape(-1, x.shape[-1]), w).view(*lead, w.shape[0])
