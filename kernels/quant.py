"""Per-block FP8 (e4m3) activation quantisation, as DeepSeek's act_quant kernel (the model calls `act_quant`).

For each row and each group of `block` (128) contiguous values:
a = max(amax(|x|), 1e-4); s = 2^ceil(log2(a / 448)) with ue8m0 (computed exactly from the float's
bits: no log2 rounding), else a / 448; q = e4m3(clamp(x / s, -448, 448)) (round to nearest even).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, interpreting, next_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def act_quant_ref(x: torch.Tensor, block: int = 128, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"last dim {d} is not a multiple of {block}")
    g = x.to(torch.float32).unflatten(-1, (d // block, block))
    s = g.abs().amax(dim=-1).clamp(min=1e-4) / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (g / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2), s


if HAS_TRITON:

    @triton.jit
    def round_to_e4m3(v):
        """fp32 -> the nearest e4m3 value (ties to even), still in fp32; |v| <= 448.

        Only for Triton's CPU interpreter, whose fp32 -> fp8 conversion drops the carry when
        rounding crosses a power of two (triton 3.9: 1.97 -> 1.0); after this the conversion is exact.
        """
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF  # 3 mantissa bits, RNE
        normal = bits.to(tl.float32, bitcast=True)
        sub = (a + 16384.0) - 16384.0  # multiples of 2^-9, RNE
        r = tl.where(a < 0.015625, sub, normal)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _act_quant_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        rows,
        s_x,
        s_q,
        s_s,
        BLOCK: tl.constexpr,
        BLOCK_R: tl.constexpr,
        UE8M0: tl.constexpr,
        INTERP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        g = tl.program_id(1)
        offs_c = g * BLOCK + tl.arange(0, BLOCK)
        rmask = offs_r < rows
        r64 = offs_r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * s_x + offs_c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        # IEEE divisions (div_rn): Triton's fp32 `/` is div.full.f32 on NVIDIA GPUs (up to 2 ulp off),
        # which moves amax / 448 across a power of two (amax = 7 * 2^j, common in bf16) or a quotient
        # across an e4m3 rounding boundary, where torch's reference and the CPU interpreter divide exactly
        s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), 448.0)
        if UE8M0:  # 2^ceil(log2(s)) from the bits (s is a normal float here)
            bits = s.to(tl.int32, bitcast=True)
            e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
            s = (e << 23).to(tl.float32, bitcast=True)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None]), -448.0), 448.0)
        if INTERP:
            q = round_to_e4m3(q)
        tl.store(q_ptr + r64[:, None] * s_q + offs_c[None, :], q.to(q_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.store(s_ptr + r64 * s_s + g, s, mask=rmask)


def act_quant_triton(x: torch.Tensor, block: int = 128, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    d = x.shape[-1]
    if d % block or block & (block - 1):
        raise ValueError(f"last dim {d} is not a multiple of {block} (a power of two)")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    q = torch.empty(rows, d, device=x.device, dtype=FP8_DTYPE)
    s = torch.empty(rows, d // block, device=x.device, dtype=torch.float32)
    block_r = min(16, next_pow2(rows))
    _act_quant_kernel[(triton.cdiv(rows, block_r), d // block)](
        x2,
        q,
        s,
        rows,
        x2.stride(0),
        q.stride(0),
        s.stride(0),
        BLOCK=block,
        BLOCK_R=block_r,
        UE8M0=ue8m0,
        INTERP=interpreting(_act_quant_kernel),
        num_warps=4,
        **pdl(_act_quant_kernel, x2),
    )
    return q.view(x.shape), s.view(*x.shape[:-1], d // block)


def act_quant(x: torch.Tensor, block: int = 128, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D % block == 0) -> (float8_e4m3fn [..., D], fp32 scales [..., D // block]);
    x ≈ q * s per group."""
    fn = act_quant_triton if use_triton(x) else act_quant_ref
    return fn(x, block, ue8m0)
