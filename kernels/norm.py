"""RMSNorm fused with the residual add (the decoder layer's `h = x + residual; y = norm(h)`).

Numerics follow model/norm.py (transformers' convention): the sum x + residual is rounded to x's
dtype (that is the new residual stream), normalised in fp32, cast back to x's dtype, then scaled
by the weight (result in promote_types(weight, x) — the model dtype when both are).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, next_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(x.dtype)
    return y if residual is None else (y, x)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        y_ptr,
        h_ptr,
        dim,
        eps,
        s_x,
        s_r,
        s_y,
        s_h,
        BLOCK: tl.constexpr,
        HAS_RES: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < dim
        x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            x = x.to(tl.float32) + tl.load(r_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
            x = x.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * s_h + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
        n = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * s_y + offs, (n * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    shape, dim = x.shape, x.shape[-1]
    x2 = x.reshape(-1, dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, dim, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    if residual is not None:
        r2 = residual.reshape(-1, dim)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(rows, dim, device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        r2, h = x2, y
    block = next_pow2(dim)
    warps = 1 if block <= 512 else 4 if block <= 4096 else 8
    _rms_norm_kernel[(rows,)](
        x2,
        r2,
        weight,
        y,
        h,
        dim,
        eps,
        x2.stride(0),
        r2.stride(0),
        y.stride(0),
        h.stride(0),
        BLOCK=block,
        HAS_RES=residual is not None,
        num_warps=warps,
        **pdl(_rms_norm_kernel, x2),
    )
    y = y.view(shape)
    return y if residual is None else (y, h.view(shape))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally fused with the residual add.

    Args:
        x: [..., D] activations (bf16 in the model).
        weight: [D] norm weight.
        eps: epsilon (rms_norm_eps, 1e-6).
        residual: [..., D] or None. When given, h = x + residual is formed first.
    Returns:
        y = weight * norm(x) — or (y, h) with h = x + residual (the new residual stream) when
        `residual` is given. Out of place.
    """
    fn = rms_norm_triton if use_triton(x) else rms_norm_ref
    return fn(x, weight, eps, residual)
