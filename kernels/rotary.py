"""Rotary embedding in DeepSeek-V3.2's two layouts (the model calls `rope`; model/rope.py makes cos/sin).

- interleaved (MLA's q_rope / k_rope): rotation pairs (x0, x1), (x2, x3), ...; the output is laid
  out de-interleaved as [rotated evens ‖ rotated odds] (transformers' order, which the cache keeps);
- half-split (the indexer's first 64 dims): pairs (x_i, x_{i + d/2}), output in place order.

cos/sin are [N, d/2] per token (RotaryTable.cos_sin). The Triton kernel computes in fp32 and
rounds once; the reference rounds after each operation in x's dtype (differences of ~1 ulp).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, next_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


if HAS_TRITON:

    @triton.jit
    def _rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        o_ptr,
        m_total,
        s_xn,
        s_xm,
        s_cn,
        s_sn,
        s_on,
        s_om,
        HALF: tl.constexpr,
        BLOCK_M: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        n = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, HALF)
        mask = offs_m[:, None] < m_total
        c = tl.load(cos_ptr + n * s_cn + offs_j).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + n * s_sn + offs_j).to(tl.float32)[None, :]
        base = x_ptr + n * s_xn + offs_m[:, None] * s_xm
        if INTERLEAVED:
            x1 = tl.load(base + 2 * offs_j[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + 2 * offs_j[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(base + offs_j[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + offs_j[None, :], mask=mask, other=0.0).to(tl.float32)
        out = o_ptr + n * s_on + offs_m[:, None] * s_om + offs_j[None, :]
        ty = o_ptr.dtype.element_ty
        tl.store(out, (x1 * c - x2 * s).to(ty), mask=mask)
        tl.store(out + HALF, (x2 * c + x1 * s).to(ty), mask=mask)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    require_triton()
    n, d = x.shape[0], x.shape[-1]
    half = d // 2
    if d % 2 or half & (half - 1) or cos.shape != (n, half) or sin.shape != (n, half):
        raise ValueError(f"rope dim {d} must be 2 x a power of two and cos/sin [N, {half}]")
    xv = x.reshape(n, -1, d)  # a view whenever the middle dims collapse (q[..., 128:] slices do)
    if xv.stride(-1) != 1:
        xv = xv.contiguous()
    m = xv.shape[1]
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    out = torch.empty(n, m, d, device=x.device, dtype=torch.promote_types(x.dtype, cos.dtype))
    block_m = min(64, next_pow2(m))
    _rope_kernel[(n, triton.cdiv(m, block_m))](
        xv,
        cos,
        sin,
        out,
        m,
        xv.stride(0),
        xv.stride(1),
        cos.stride(0),
        sin.stride(0),
        out.stride(0),
        out.stride(1),
        HALF=half,
        BLOCK_M=block_m,
        INTERLEAVED=interleaved,
        num_warps=4,
        **pdl(_rope_kernel, xv),
    )
    return out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x by per-token angles.

    Args:
        x: [N, ..., d] (e.g. q_rope [N, H, 64], k_rope [N, 64], indexer q[..., :64] [N, 64, 64]);
            the last dim must be contiguous; other dims may be strided (slices of q are fine).
        cos, sin: [N, d/2] (RotaryTable.cos_sin), any float dtype.
        interleaved: True for MLA (pairs (2i, 2i+1), output [evens' ‖ odds']), False for the
            indexer's half-split form.
    Returns:
        a new [N, ..., d] tensor in promote_types(x, cos).
    """
    fn = rope_triton if use_triton(x) else rope_ref
    return fn(x, cos, sin, interleaved)
