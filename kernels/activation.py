"""SwiGLU's activation, silu(gate) * up, in one kernel (the dense MLP's and the shared experts').

torch runs F.silu(gate) * up as two kernels with a rounding to the model dtype between them; the kernel
computes silu in fp32 as torch's CUDA kernel does (x / (1 + exp(-x)) with CUDA's expf and a correctly
rounded division), rounds it to the dtype, multiplies in fp32 and rounds again: the same operations, so
the same values but where the two expf builds differ in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._common import HAS_TRITON, interpreting, pdl, pdl_start, require_triton, tl, triton, use_triton

if HAS_TRITON:
    from triton.language.extra import libdevice


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _silu_mul_kernel(
        g_ptr, u_ptr, o_ptr, cols, s_g, s_u, s_o, BLOCK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr = False
    ):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        g = tl.load(g_ptr + row * s_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * s_u + offs, mask=mask, other=0.0).to(tl.float32)
        if INTERP:  # the CPU interpreter has no libdevice
            s = g / (1.0 + tl.exp(-g))
        else:
            s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
        ty = o_ptr.dtype.element_ty
        tl.store(o_ptr + row * s_o + offs, (s.to(ty).to(tl.float32) * u).to(ty), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    require_triton()
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype}, {tuple(up.shape)} {up.dtype}")
    cols = gate.shape[-1]
    g, u = gate.reshape(-1, cols), up.reshape(-1, cols)  # views for the fused GEMM's column slices
    if g.stride(-1) != 1:
        g = g.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    out = torch.empty(g.shape, device=gate.device, dtype=gate.dtype)
    if out.numel() == 0:
        return out.view(gate.shape)
    block = 1024
    _silu_mul_kernel[(g.shape[0], triton.cdiv(cols, block))](
        g,
        u,
        out,
        cols,
        g.stride(0),
        u.stride(0),
        out.stride(0),
        BLOCK=block,
        INTERP=interpreting(_silu_mul_kernel),
        num_warps=4,
        **pdl(_silu_mul_kernel, g),
    )
    return out.view(gate.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., I] tensors of one dtype (slices of a fused GEMM's output are fine).
    One Triton kernel on CUDA without autograd, F.silu(gate) * up otherwise."""
    grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    fn = silu_mul_triton if _common.GLUE_KERNELS and use_triton(gate) and not grad else silu_mul_ref
    return fn(gate, up)
