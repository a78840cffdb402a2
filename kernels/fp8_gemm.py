"""Block-scaled FP8 linear layer: y = x @ W^T with W in e4m3 and one fp32 scale per 128x128 block.

Layout (a DeepSeek checkpoint's, `weight` + `weight_scale_inv`)::

    x        [..., K]                     bf16 / fp32 activations
    weight   [N, K]                       float8_e4m3fn
    scale    [ceil(N/128), ceil(K/128)]   fp32: W[n, k] = weight[n, k] * scale[n // 128, k // 128]
    y        [..., N]                     x's dtype

Activations are quantised per row per 128 contiguous values exactly as act_quant does (DeepSeek's
act_quant with ue8m0 scales: s = 2^ceil(log2(max(amax, 1e-4) / 448)), q = e4m3(x / s)); a last
group shorter than 128 (K % 128 != 0, small test presets only) is quantised as if zero-padded.
Each 128-deep step's e4m3 x e4m3 dot is accumulated in fp32 and multiplied by a_scale * w_scale
(DeepSeek's fp8_gemm), so:

    y[m, n] = sum_g  s_a[m, g] * scale[n // 128, g] * sum_{k in g} q_a[m, k] * weight[n, k]

Triton kernels, dispatched by M (`fp8_linear`):
- decode M (<= GEMV_MAX_M = 64): the weight-streaming GEMV (`fp8_gemv_triton`, "small M" below);
- above: the tiles kernel, one program per (BLOCK_M rows, BLOCK_N columns, split of K), after
  act_quant (one Triton kernel) writes e4m3 + scales; 128x128 tiles. `fp8_linear_triton` can also
  quantise the rows in registers and split K (fused=1: what served M <= 64 before the GEMV; kept for
  comparison, bench/fp8_diagnose.py and `splitserve bench engine --fp8-decode-kernels tiles`).
The weight is read once per column block of M rows; bytes = N*K (e4m3) + 4*ceil(N/128)*ceil(K/128).

Accuracy on Hopper (sm_90). tl.dot of two e4m3 tiles into fp32 lowers to the FP8 tensor-core
instruction, whose accumulation inside one instruction chain keeps only ~14 bits (DeepSeek-V3
report, sec. 3.3.2); Triton's NVIDIA backend allows that chain to run over the whole dot on sm_90
(`max_num_imprecise_acc_default = 2**30 if capability == 90`, triton/backends/nvidia/compiler.py).
It applies to the warpgroup MMA (wgmma), which Triton picks for tiles of >= 64 rows (BLOCK_M 64 and
128 here, i.e. M > 32); BLOCK_M 16/32 tiles get mma.sync (their tests pass at 1e-5 on an H200). Each 128-deep step is
promoted to the fp32 accumulator (scaled by a_scale * w_scale), exactly DeepSeek's fp8_gemm /
DeepGEMM scheme (promotion interval 128), so the error stays at ~1e-4 relative per output (measured
2.9e-4 on an H200 at M=40, K=256) instead of growing with K. This is the FP8 tensor core's own
rounding, as TF32 is for fp32 GEMMs, not a defect: the kernel keeps e4m3 operands (twice the
bf16 tensor rate, which prefill needs) and the GPU tests allow 2e-3 for >= 64-row tiles.
`precise=True` (a constexpr; default off) converts both tiles to fp16 before the dot (exact:
every e4m3 value, subnormals included, is an fp16 value; products are exact in fp32; half the FP8
tensor rate), for comparisons and measurements (bench/fp8_diagnose.py prints both).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
from .quant import FP8_DTYPE, act_quant, act_quant_ref

GROUP = 128


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] must agree; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    expect = (math.ceil(weight.shape[0] / GROUP), math.ceil(weight.shape[1] / GROUP))
    if tuple(scale.shape) != expect:
        raise ValueError(f"scale must be {expect} for weight {tuple(weight.shape)}, got {tuple(scale.shape)}")


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def quantize_act_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> the values the FP8 GEMM multiplies (fp32): act_quant round trip per 1x128 group,
    a partial last group quantised as if zero-padded."""
    k = x.shape[-1]
    kp = -(-k // GROUP) * GROUP
    xf = F.pad(x.float(), (0, kp - k))
    q, s = act_quant_ref(xf, GROUP, True)
    return (q.float().unflatten(-1, (-1, GROUP)) * s[..., None]).flatten(-2)[..., :k]


def dequant_weight_ref(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] e4m3 + [ceil(N/128), ceil(K/128)] -> [N, K] fp32."""
    n, k = weight.shape
    s = scale.float().repeat_interleave(GROUP, 0)[:n].repeat_interleave(GROUP, 1)[:, :k]
    return weight.float() * s


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check(x, weight, scale)
    return (quantize_act_ref(x) @ dequant_weight_ref(weight, scale).t()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    from .quant import round_to_e4m3

    @triton.jit
    def _fp8_gemm_kernel(
        x_ptr,
        xs_ptr,
        w_ptr,
        ws_ptr,
        y_ptr,
        M,
        N,
        K,
        k_per_split,
        s_xm,
        s_xsm,
        s_wn,
        s_wsn,
        s_ys,
        s_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FUSED_QUANT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = offs_m < M
        nmask = offs_n < N
        m64 = offs_m.to(tl.int64)
        n64 = offs_n.to(tl.int64)
        offs_g = tl.arange(0, 128)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, 128):
            offs_k = k0 + offs_g
            kmask = offs_k < K
            a = tl.load(x_ptr + m64[:, None] * s_xm + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if FUSED_QUANT:  # act_quant of this 1x128 group, in registers (ue8m0 scale from the bits)
                a = a.to(tl.float32)
                # IEEE divisions as in quant.py's act_quant kernel (`/` is div.full.f32 on GPUs)
                sa = tl.math.div_rn(tl.maximum(tl.max(tl.abs(a), axis=1), 1e-4), 448.0)
                bits = sa.to(tl.int32, bitcast=True)
                e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
                sa = (e << 23).to(tl.float32, bitcast=True)
                a = tl.minimum(tl.maximum(tl.math.div_rn(a, sa[:, None]), -448.0), 448.0)
                if UPCAST:
                    a = round_to_e4m3(a)
                else:
                    a = a.to(tl.float8e4nv)
            else:
                sa = tl.load(xs_ptr + m64 * s_xsm + k0 // 128, mask=mmask, other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
            b = tl.load(w_ptr + n64[None, :] * s_wn + offs_k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            sw = tl.load(ws_ptr + (offs_n // 128) * s_wsn + k0 // 128, mask=nmask, other=0.0)
            if PRECISE and not UPCAST:  # every e4m3 value is an fp16 value (one cvt): exact products, fp32 sums
                a = a.to(tl.float16)
                b = b.to(tl.float16)
            acc += tl.dot(a, b) * (sa[:, None] * sw[None, :])
        tl.store(
            y_ptr + pid_s * s_ys + m64[:, None] * s_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mmask[:, None] & nmask[None, :],
        )


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _config(m: int, n: int, k: int, sms: int) -> dict[str, int]:
    """Launch parameters by shape. Decode (M <= 64): 64-column tiles of the weight, K split until
    about two programs per SM stream it (while the fp32 partial sums stay small beside the weight);
    prefill: 128x128 tiles over pre-quantised activations."""
    if m > 64:
        return dict(block_m=128, block_n=128, splits=1, num_warps=8, num_stages=3, fused=0)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64
    kblocks = -(-k // GROUP)
    tiles = -(-m // block_m) * -(-n // block_n)
    splits = 1
    while tiles * splits < 2 * sms and kblocks >= 4 * splits and 2 * splits * m * n * 4 * 2 <= n * k // 2:
        splits *= 2
    return dict(block_m=block_m, block_n=block_n, splits=splits, num_warps=4, num_stages=4, fused=1)


def fp8_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
    fused: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precise: bool = False,
) -> torch.Tensor:
    """The Triton GEMM; the keyword arguments override the launch choice of `_config` (tests, sweeps).
    precise=True feeds the tensor cores fp16 copies of the e4m3 operands (exact) instead of e4m3:
    see the module docstring's "Accuracy on Hopper"."""
    require_triton()
    _check(x, weight, scale)
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if weight.stride(1) != 1 or scale.stride(1) != 1:
        raise ValueError("weight and scale need a contiguous last dimension")
    cfg = _config(m, n, k, _sm_count(x.device))
    for key, v in (
        ("block_m", block_m),
        ("block_n", block_n),
        ("splits", splits),
        ("fused", fused),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    ):
        if v is not None:
            cfg[key] = int(v)
    kblocks = -(-k // GROUP)
    per_split = -(-kblocks // cfg["splits"]) * GROUP
    nsplit = -(-k // per_split)
    if cfg["fused"]:
        xq, xs = x2, x2
    else:
        kp = kblocks * GROUP
        xq, xs = act_quant(F.pad(x2, (0, kp - k)) if kp != k else x2, GROUP, True)
    if nsplit == 1:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        s_ys = 0
    else:
        y = torch.empty(nsplit, m, n, device=x.device, dtype=torch.float32)
        s_ys = y.stride(0)
    kern = _fp8_gemm_kernel
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]), nsplit)
    kern[grid](
        xq,
        xs,
        weight,
        scale,
        y,
        m,
        n,
        k,
        per_split,
        xq.stride(0),
        0 if cfg["fused"] else xs.stride(0),
        weight.stride(0),
        scale.stride(0),
        s_ys,
        y.stride(-2),
        BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"],
        FUSED_QUANT=bool(cfg["fused"]),
        UPCAST=interpreting(kern),
        PRECISE=bool(precise),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **pdl(kern, xq),
    )
    if nsplit > 1:
        part, y = y, torch.empty(m, n, device=x.device, dtype=x.dtype)
        splitk_sum(part, y)
    return y.view(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# small M: weight-streaming GEMV (decode)
# ---------------------------------------------------------------------------------------------
# At decode sizes (M <= GEMV_MAX_M) a linear is a stream of its e4m3 weight: N*K bytes against
# 2*M*N*K flops, far below the tensor cores' balance point, so the kernel is built to keep HBM busy.
# One program owns BLOCK_N weight rows and one split of K: per 128-deep step it loads one
# [BLOCK_N, 128] e4m3 tile (128 contiguous bytes a row: 16-byte loads, fully coalesced), the
# tile's one fp32 block scale, and the M activation rows' 1x128 group, which it quantises in
# registers exactly as act_quant does (ue8m0 scale from the amax's bits; x / s as x * 2^-e, which
# equals the IEEE quotient because s is a power of two). The activation bytes are negligible
# beside the weight's (M * 128 values against BLOCK_N * 128 bytes a step), so quantising them costs
# nothing measurable, and it keeps one contract for every M: the same fp8_linear_ref as the
# prefill tiles, results that do not depend on the batch size's path, and the checks in
# tests / bench/fp8_diagnose.py unchanged. (Weight-only dequantisation against bf16 activations
# would be closer to the bf16-dequantised model, but then the answer would change with the batch
# size crossing GEMV_MAX_M.) The dot of a step is either CUDA-core FMAs (DOT=False, for M <= 4: the
# weight tile upcast to fp32, one row at a time; 2-4x slower than the MMA on an H200, kept for the
# sweep) or one tensor-core MMA with the weight as the tall operand (DOT=True, "swap AB":
# [BLOCK_N, 128] x [128, BLOCK_M>=16], so BLOCK_N = 64 rows fill Hopper's 64-row wgmma while M is
# only the narrow side). Each step's dot is scaled by
# s_a * s_w and added in fp32 (DeepSeek's promotion interval of 128). K is split across programs
# until about `ctas_per_sm` programs per SM stream the weight; the fp32 partials ([splits, M, N],
# small beside the weight) are summed by one more tiny launch. With more rows (prequant=True: the
# sweep's pick from M = 8) the per-program quantisation of M x 128 values a step would cost as much ALU as the
# weight tile; then act_quant runs once first (one small launch) and the kernel loads e4m3 rows and
# their scales instead: the same numbers.


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows per program (16/32/64/128: inside one 128-row scale block)
    ctas_per_sm: int  # split K until (N / block_n) * splits >= ctas_per_sm * SMs
    num_warps: int
    num_stages: int
    dot: bool  # tensor-core MMA (swap AB) instead of CUDA-core FMAs
    prequant: bool = False  # act_quant launch first instead of quantising in registers


# Launch choice by M class (the largest M of the class -> config), measured by bench/fp8_sweep.py
# (`bash bench/run_fp8_gpu.sh OUT sweep` prints "table row" lines in this form): H200, 2026-12-02,
# bench/results/fp8-h200/fp8-sweep-run1.log (one coordinate-descent pass from FMA-first guesses; the
# tensor-core path won every class, the FMA path lost 2-4x at M = 1 and 4).
GEMV_TABLE: dict[int, GemvConfig] = {
    1: GemvConfig(block_n=64, ctas_per_sm=16, num_warps=8, num_stages=4, dot=True, prequant=False),
    4: GemvConfig(block_n=128, ctas_per_sm=16, num_warps=4, num_stages=4, dot=True, prequant=False),
    16: GemvConfig(block_n=64, ctas_per_sm=2, num_warps=4, num_stages=4, dot=True, prequant=True),
    64: GemvConfig(block_n=128, ctas_per_sm=4, num_warps=4, num_stages=4, dot=True, prequant=True),
}
GEMV_MAX_M = max(GEMV_TABLE)  # fp8_linear sends M <= GEMV_MAX_M rows here (read at every call)


def gemv_class(m: int) -> int:
    """The GEMV_TABLE key serving M rows (the smallest class >= m)."""
    for c in sorted(GEMV_TABLE):
        if m <= c:
            return c
    raise ValueError(f"M={m} is above GEMV_MAX_M={GEMV_MAX_M}")


def gemv_splits(n: int, k: int, m: int, block_n: int, ctas_per_sm: int, sms: int) -> int:
    """Split-K factor: a power of two until (N / block_n) * splits >= ctas_per_sm * SMs, at most one
    split per 128-deep block, and the fp32 partials (splits * M * N * 4 bytes) at most 1/8 of the
    weight's bytes."""
    kblocks = -(-k // GROUP)
    tiles = -(-n // block_n)
    splits = 1
    while tiles * splits < ctas_per_sm * sms and 2 * splits <= kblocks and 2 * splits * m * n * 4 * 8 <= n * k:
        splits *= 2
    return splits


if HAS_TRITON:

    @triton.jit
    def quant_group(a, UPCAST: tl.constexpr):
        """a [R, 128] fp32 -> (q [R, 128], s [R]): act_quant of each row's 1x128 group (ue8m0 scale;
        q = e4m3(clamp(a / s)), returned as fp32 values holding e4m3 numbers)."""
        s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(a), axis=1), 1e-4), 448.0)
        bits = s.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
        inv = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 1 / s, exact: s is a power of two
        q = tl.minimum(tl.maximum(a * inv[:, None], -448.0), 448.0)
        if UPCAST:
            q = round_to_e4m3(q)
        else:
            q = q.to(tl.float8e4nv).to(tl.float32)
        return q, s

    @triton.jit
    def tile_dot(
        w,
        q,
        offs_m,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        DOT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISE: tl.constexpr,
    ):
        """w [BLOCK_N, 128] e4m3 tile, q [BLOCK_M, 128] fp32 holding e4m3 values -> w @ q^T [BLOCK_N, BLOCK_M]
        in fp32 (unscaled), on the tensor cores (DOT) or as CUDA-core FMAs."""
        if DOT:
            if UPCAST:  # the interpreter: fp32 operands (exact)
                part = tl.dot(w.to(tl.float32), tl.trans(q))
            elif PRECISE:  # fp16 operands: exact products, full fp32 accumulation
                part = tl.dot(w.to(tl.float16), tl.trans(q.to(tl.float16)))
            else:  # e4m3 operands (q holds e4m3 values: the conversion is exact)
                part = tl.dot(w, tl.trans(q.to(tl.float8e4nv)))
        else:
            wf = w.to(tl.float32)
            part = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for mi in tl.static_range(BLOCK_M):
                row = tl.sum(tl.where(offs_m[:, None] == mi, q, 0.0), axis=0)
                d = tl.sum(wf * row[None, :], axis=1)
                part += tl.where(offs_m[None, :] == mi, d[:, None], 0.0)
        return part

    @triton.jit
    def _fp8_gemv_kernel(
        x_ptr,
        xs_ptr,
        w_ptr,
        ws_ptr,
        y_ptr,
        M,
        N,
        K,
        k_per_split,
        s_xm,
        s_xsm,
        s_wn,
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
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        offs_g = tl.arange(0, 128)
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn + offs_g[None, :]
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_g[None, :]
        ws_row = ws_ptr + ((pid_n * BLOCK_N) // 128) * s_wsn  # BLOCK_N divides 128: one scale row a tile
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, 128):
            kmask = (k0 + offs_g) < K
            w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
            a = tl.load(x_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            sw = tl.load(ws_row + k0 // 128)
            if PREQUANT:  # x holds act_quant's e4m3 values, xs its scales
                q = a
                sa = tl.load(xs_ptr + offs_m * s_xsm + k0 // 128, mask=mmask, other=0.0)
            else:
                q, sa = quant_group(a, UPCAST)
            part = tile_dot(w, q, offs_m, BLOCK_N, BLOCK_M, DOT, UPCAST, PRECISE)
            acc += part * (sa[None, :] * sw)
        tl.store(
            y_ptr + pid_s * s_ys + offs_m[None, :] * s_ym + offs_n[:, None],
            acc.to(y_ptr.dtype.element_ty),
            mask=nmask[:, None] & mmask[None, :],
        )


def fp8_gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_n: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    dot: bool | None = None,
    prequant: bool | None = None,
    precise: bool = False,
) -> torch.Tensor:
    """The weight-streaming kernel for M <= GEMV_MAX_M rows (contract of fp8_linear_ref); keyword
    arguments override GEMV_TABLE's choice (tests, bench/fp8_sweep.py)."""
    require_triton()
    _check(x, weight, scale)
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"fp8_gemv serves M <= GEMV_MAX_M = {GEMV_MAX_M} rows, got {m}")
    if weight.stride(1) != 1 or scale.stride(1) != 1:
        raise ValueError("weight and scale need a contiguous last dimension")
    cfg = GEMV_TABLE[gemv_class(m)]
    bn = int(block_n or cfg.block_n)
    if bn not in (16, 32, 64, 128):
        raise ValueError(f"block_n must be 16, 32, 64 or 128 (inside one scale block), got {bn}")
    use_dot = cfg.dot if dot is None else bool(dot)
    pre = cfg.prequant if prequant is None else bool(prequant)
    block_m = max(16, next_pow2(m)) if use_dot else next_pow2(m)
    sp = int(splits) if splits is not None else gemv_splits(n, k, m, bn, cfg.ctas_per_sm, _sm_count(x.device))
    kblocks = -(-k // GROUP)
    per_split = -(-kblocks // max(1, sp)) * GROUP
    nsplit = -(-k // per_split)
    if nsplit == 1:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        s_ys = 0
    else:
        y = torch.empty(nsplit, m, n, device=x.device, dtype=torch.float32)
        s_ys = y.stride(0)
    if pre:
        kp = kblocks * GROUP
        xq, xs = act_quant(F.pad(x2, (0, kp - k)) if kp != k else x2, GROUP, True)
    else:
        xq, xs = x2, x2
    kern = _fp8_gemv_kernel
    kern[(triton.cdiv(n, bn), nsplit)](
        xq,
        xs,
        weight,
        scale,
        y,
        m,
        n,
        k,
        per_split,
        xq.stride(0),
        xs.stride(0) if pre else 0,
        weight.stride(0),
        scale.stride(0),
        s_ys,
        y.stride(-2),
        BLOCK_M=block_m,
        BLOCK_N=bn,
        DOT=use_dot,
        UPCAST=interpreting(kern),
        PRECISE=bool(precise),
        PREQUANT=pre,
        num_warps=int(num_warps or cfg.num_warps),
        num_stages=int(num_stages or cfg.num_stages),
        **pdl(kern, xq),
    )
    if nsplit > 1:
        part, y = y, torch.empty(m, n, device=x.device, dtype=x.dtype)
        splitk_sum(part, y)
    return y.view(*x.shape[:-1], n)


def fp8_linear_path(m: int) -> str:
    """Which Triton kernel fp8_linear runs for M rows: "gemv" (weight streaming) or "tiles"."""
    return "gemv" if m <= GEMV_MAX_M else "tiles"


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ dequant(weight, scale)^T with x quantised per 1x128 group (act_quant, ue8m0).

    On CUDA: the weight-streaming GEMV for M <= GEMV_MAX_M rows, the tiled GEMM above.

    Args:
        x: [..., K] bf16 or fp32 activations.
        weight: [N, K] float8_e4m3fn, contiguous rows.
        scale: [ceil(N/128), ceil(K/128)] fp32 block multipliers (`weight_scale_inv`).
    Returns:
        [..., N] in x's dtype.
    """
    if not use_triton(x):
        return fp8_linear_ref(x, weight, scale)
    if fp8_linear_path(x.numel() // max(1, x.shape[-1])) == "gemv":
        return fp8_gemv_triton(x, weight, scale)
    return fp8_linear_triton(x, weight, scale)
