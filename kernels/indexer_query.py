"""The lightning indexer's queries and head weights, from the projection outputs: one kernel.

Per token n and head h, from q = wq_b(q_resid) [N, H, D] and w = weights_proj(x) [N, H] fp32:

    q' = rope(q[:rope_dim]) ‖ q[rope_dim:]                  (the indexer's rope layout)
    exact indexer: q_out = q' (in out_dtype),  w_out = w * H^-0.5 * softmax_scale
    FP8 indexer:   q_out, s = act_quant(q' @ Hadamard * D^-0.5)   (e4m3, one ue8m0 scale per head)
                   w_out = w * H^-0.5 * s * softmax_scale

which is what model.attention.Indexer.queries and MLA._rows did in about eight kernels (rope, a
concatenation, the Hadamard matmul and its scaling, act_quant, three multiplies) and what
indexer_topk_decode takes. The reference is that composition of the kernels' references, op for op;
the kernel rounds to q's dtype where it does (the rotated values, the Hadamard product and its
scaling), as kernels/cache_write.py does for the keys, so the two differ by the ulps the separate
Triton rope kernel differs by; the multiplies of w are the same fp32 operations in the same order.
"""

from __future__ import annotations

import torch

from . import _common
from ._common import HAS_TRITON, interpreting, is_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton
from .quant import act_quant_ref
from .rotary import rope_ref

if HAS_TRITON:
    from .cache_write import _hadamard_e4m3, _rotated

FP8_DTYPE = torch.float8_e4m3fn


def index_query_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    hadamard: torch.Tensor | None,
    softmax_scale: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, heads, d = q.shape
    rope_dim = 2 * cos.shape[-1]
    q = torch.cat([rope_ref(q[..., :rope_dim], cos, sin, interleaved), q[..., rope_dim:]], dim=-1)
    w = w.float() * heads**-0.5
    if hadamard is None:
        return q.to(out_dtype), w * softmax_scale
    qq, qs = act_quant_ref((q @ hadamard) * d**-0.5, d)
    return qq, w * qs[..., 0] * softmax_scale


if HAS_TRITON:

    @triton.jit
    def _index_query_kernel(
        q_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        h_ptr,
        qo_ptr,
        wo_ptr,
        heads,
        w_scale,
        h_scale,
        softmax_scale,
        s_qn,
        s_qh,
        s_wn,
        s_c,
        s_s,
        s_on,
        s_oh,
        s_won,
        D: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        FP8: tl.constexpr,
        INTERP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        n = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = hs < heads
        offs_d = tl.arange(0, D)
        ty = q_ptr.dtype.element_ty
        key = _rotated(
            q_ptr + n * s_qn + hs[:, None].to(tl.int64) * s_qh,
            cos_ptr + n * s_c,
            sin_ptr + n * s_s,
            hs,
            hmask,
            offs_d,
            HALF,
            INTERLEAVED,
            False,
            w_scale,
            w_scale,
            w_ptr,
            w_ptr,
            ty,
        )
        w = tl.load(w_ptr + n * s_wn + hs, mask=hmask, other=0.0).to(tl.float32) * w_scale
        o_rows = qo_ptr + n * s_on + hs[:, None].to(tl.int64) * s_oh + offs_d[None, :]
        if FP8:
            qv, sc = _hadamard_e4m3(key, h_ptr, h_scale, offs_d, D, INTERP)
            tl.store(o_rows, qv.to(qo_ptr.dtype.element_ty), mask=hmask[:, None])
            w = w * sc
        else:
            tl.store(o_rows, key.to(qo_ptr.dtype.element_ty), mask=hmask[:, None])
        tl.store(wo_ptr + n * s_won + hs, w * softmax_scale, mask=hmask)


def index_query_fits(q: torch.Tensor, cos: torch.Tensor) -> bool:
    """Shapes the kernel serves: power-of-two head and rope widths (head >= 16), contiguous last dims."""
    half, d = cos.shape[-1], q.shape[-1]
    return q.dim() == 3 and is_pow2(half) and is_pow2(d) and d >= 16 and 2 * half <= d and q.stride(-1) == 1


def index_query_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    hadamard: torch.Tensor | None,
    softmax_scale: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    if not index_query_fits(q, cos):
        raise ValueError("index_query_triton: shapes outside index_query_fits (see its docstring)")
    n, heads, d = q.shape
    fp8 = hadamard is not None
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    q_out = torch.empty(n, heads, d, device=q.device, dtype=FP8_DTYPE if fp8 else out_dtype)
    w_out = torch.empty(n, heads, device=q.device, dtype=torch.float32)
    if n == 0:
        return q_out, w_out
    h = hadamard.contiguous() if hadamard is not None else w
    block_h = 16
    _index_query_kernel[(n, triton.cdiv(heads, block_h))](
        q,
        w,
        cos,
        sin,
        h,
        q_out,
        w_out,
        heads,
        heads**-0.5,
        d**-0.5,
        float(softmax_scale),
        q.stride(0),
        q.stride(1),
        w.stride(0),
        cos.stride(0),
        sin.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        w_out.stride(0),
        D=d,
        HALF=cos.shape[-1],
        BLOCK_H=block_h,
        INTERLEAVED=bool(interleaved),
        FP8=fp8,
        INTERP=interpreting(_index_query_kernel),
        num_warps=4,
        **pdl(_index_query_kernel, q),
    )
    return q_out, w_out


def index_query(
    q: torch.Tensor,
    w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    hadamard: torch.Tensor | None,
    softmax_scale: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's decode queries and head weights, as indexer_topk_decode takes them (module docstring).

    Args:
        q: [N, H, D] wq_b's output (before rope); w: [N, H] fp32 weights_proj's output (unscaled).
        cos, sin: [N, rope / 2] (RotaryTable.cos_sin); the first `rope` dims of each head rotate.
        interleaved: the indexer's rope layout (ModelConfig.indexer_rope_interleave).
        hadamard: the [D, D] ±1 Hadamard matrix in q's dtype for the FP8 indexer, else None.
        softmax_scale: D^-0.5, folded into the weights; out_dtype: the exact path's q dtype (the key pool's).
    Returns:
        (q [N, H, D] e4m3 (FP8) or out_dtype, weights [N, H] fp32 with every scale folded in).
    """
    fits = _common.GLUE_KERNELS and use_triton(q) and index_query_fits(q, cos)
    fn = index_query_triton if fits else index_query_ref
    return fn(q, w, cos, sin, interleaved, hadamard, softmax_scale, out_dtype)
