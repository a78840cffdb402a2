"""A layer's new cache entries, from projection outputs straight into the paged pools: one kernel.

Per token n (row of the fused input projection's outputs), at slot = block id * block_size + offset:

    latent[block, layer, offset] = rms_norm(kv_a[n, :kv_lora], kv_norm_w) ‖ rope(kv_a[n, kv_lora:]) (interleaved)
    k = rope(layer_norm(k_idx[n], k_norm_w, k_norm_b)[:rope_dim]) ‖ the rest          (indexer rope layout)
    exact indexer: ikeys[block, layer, offset] = k
    FP8 indexer:   ikeys[...] = e4m3 bits of act_quant(k @ H * D^-0.5), iscale[...] = its ue8m0 scale

which is what model.attention (MLA.forward, Indexer.keys) and engine.cache.CachePool.write do in
about 20 kernels (norms, two ropes, two concatenations, dtype copies, the Hadamard matmul and
scaling, act_quant, slot arithmetic, three index_put writes). The reference is that composition of
the kernels' own references, op for op; the Triton kernel computes each stage in fp32 and rounds to
the model dtype where the composition does (the normalised values, the rotated values, the Hadamard
product and its scaling), so it differs from the reference by the ulps the separate Triton kernels
differ by. Pools with the FP8 latent format (656-byte entries) are not fused (the dispatcher's
caller keeps the unfused path for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, interpreting, is_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton
from .norm import rms_norm_ref
from .quant import act_quant_ref
from .rotary import rope_ref

if HAS_TRITON:
    from .quant import round_to_e4m3

FP8_DTYPE = torch.float8_e4m3fn


def indexer_key_ref(
    k_idx: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_norm_w: torch.Tensor,
    k_norm_b: torch.Tensor,
    k_eps: float,
    rope_dim: int,
    interleaved: bool,
    hadamard: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k_idx [N, D] -> (keys [N, D] in k_idx's dtype, None) or, with the Hadamard matrix [D, D] given,
    (e4m3 keys [N, D], fp32 scales [N]). Op for op model.attention.Indexer.keys."""
    d = k_idx.shape[-1]
    k = F.layer_norm(k_idx.float(), (d,), k_norm_w.float(), k_norm_b.float(), k_eps).to(k_idx.dtype)
    k = torch.cat([rope_ref(k[..., :rope_dim], cos, sin, interleaved), k[..., rope_dim:]], dim=-1)
    if hadamard is None:
        return k, None
    kq, ks = act_quant_ref((k @ hadamard) * d**-0.5, d)
    return kq, ks[:, 0]


def kv_write_ref(
    kv_a: torch.Tensor,
    k_idx: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_norm_w: torch.Tensor,
    kv_eps: float,
    k_norm_w: torch.Tensor,
    k_norm_b: torch.Tensor,
    k_eps: float,
    index_rope_interleaved: bool,
    hadamard: torch.Tensor | None,
    latent: torch.Tensor,
    ikeys: torch.Tensor,
    iscale: torch.Tensor | None,
    layer: int,
    slots: torch.Tensor,
) -> None:
    kv_lora = latent.shape[-1] - 2 * cos.shape[-1]
    rope_dim = 2 * cos.shape[-1]
    lat = rms_norm_ref(kv_a[:, :kv_lora], kv_norm_w, kv_eps)
    assert isinstance(lat, torch.Tensor)
    entries = torch.cat([lat, rope_ref(kv_a[:, kv_lora:], cos, sin, True)], dim=-1)
    keys, scale = indexer_key_ref(
        k_idx, cos, sin, k_norm_w, k_norm_b, k_eps, rope_dim, index_rope_interleaved, hadamard
    )
    bs = latent.shape[2]
    b, o = slots // bs, slots % bs
    latent[b, layer, o] = entries.to(latent.dtype)
    if iscale is None:
        ikeys[b, layer, o] = keys.to(ikeys.dtype)
    else:
        assert scale is not None
        ikeys[b, layer, o] = keys.view(torch.uint8)
        iscale[b, layer, o] = scale


if HAS_TRITON:

    @triton.jit
    def _hadamard_e4m3(key, h_ptr, h_scale, offs_d, D: tl.constexpr, INTERP: tl.constexpr):
        """Rows of `key` [R, D] rotated by the Hadamard matrix at h_ptr (times h_scale, rounded to key's dtype)
        and quantised to e4m3 with one power-of-two (ue8m0) scale per row: (values in [-448, 448] as fp32,
        scales). The references: Indexer.keys / act_quant_ref (exact fp32 products, not tf32)."""
        h = tl.load(h_ptr + offs_d[:, None] * D + offs_d[None, :])
        if INTERP:
            hk = tl.dot(key.to(tl.float32), h.to(tl.float32))
        elif key.dtype == tl.float32:  # exact fp32 products, as the reference (tf32 would round them)
            hk = tl.dot(key, h.to(tl.float32), input_precision="ieee")
        else:
            hk = tl.dot(key, h.to(key.dtype))
        hk = (hk.to(key.dtype).to(tl.float32) * h_scale).to(key.dtype).to(tl.float32)
        sc = tl.math.div_rn(tl.maximum(tl.max(tl.abs(hk), axis=1), 1e-4), 448.0)
        bits = sc.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        sc = (e << 23).to(tl.float32, bitcast=True)
        q = tl.minimum(tl.maximum(tl.math.div_rn(hk, sc[:, None]), -448.0), 448.0)
        if INTERP:
            q = round_to_e4m3(q)
        return q, sc

    @triton.jit
    def _rotated(
        src,
        cos_ptr,
        sin_ptr,
        rows,
        rmask,
        d,
        HALF: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        LN: tl.constexpr,
        mean,
        rstd,
        w_ptr,
        b_ptr,
        ty: tl.constexpr,
    ):
        """Columns d of [rope(x[:2 HALF]) ‖ x[2 HALF:]] for the rows' vectors at src + rows * stride
        (src already offset by rows); with LN, x = layer_norm(x) rounded to ty first."""
        first = d < HALF
        rot = d < 2 * HALF
        j = tl.where(first, d, d - HALF)
        if INTERLEAVED:
            a = tl.where(rot, tl.where(first, 2 * j, 2 * j + 1), d)
            b = tl.where(first, 2 * j + 1, 2 * j)
        else:
            a = d
            b = tl.where(first, d + HALF, d - HALF)
        xa = tl.load(src + a[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        xb = tl.load(src + b[None, :], mask=rmask[:, None] & rot[None, :], other=0.0).to(tl.float32)
        if LN:
            xa = (xa - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + a).to(tl.float32)[None, :]
            xa = (xa + tl.load(b_ptr + a).to(tl.float32)[None, :]).to(ty).to(tl.float32)
            xb = (xb - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + b, mask=rot, other=0.0).to(tl.float32)[None, :]
            xb = (xb + tl.load(b_ptr + b, mask=rot, other=0.0).to(tl.float32)[None, :]).to(ty).to(tl.float32)
        cmask = rmask[:, None] & rot[None, :]
        c = tl.load(cos_ptr + rows[:, None] * 0 + j[None, :], mask=cmask, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + rows[:, None] * 0 + j[None, :], mask=cmask, other=0.0).to(tl.float32)
        sign = tl.where(first, -1.0, 1.0)[None, :]
        return (xa * c + sign * xb * s).to(ty)

    @triton.jit
    def _kv_write_kernel(
        kv_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        nw_ptr,
        kw_ptr,
        kb_ptr,
        h_ptr,
        slot_ptr,
        lat_ptr,
        ik_ptr,
        is_ptr,
        n_rows,
        layer,
        kv_eps,
        k_eps,
        h_scale,
        s_kv,
        s_k,
        s_c,
        s_s,
        s_l0,
        s_l1,
        s_l2,
        s_i0,
        s_i1,
        s_i2,
        s_is0,
        s_is1,
        BS: tl.constexpr,
        LAT: tl.constexpr,
        HALF: tl.constexpr,
        D: tl.constexpr,
        IHALF: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IDX_INTERLEAVED: tl.constexpr,
        FP8: tl.constexpr,
        INTERP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        slot = tl.load(slot_ptr + r64, mask=rmask, other=0).to(tl.int64)
        blk, off = slot // BS, slot % BS
        if tl.program_id(1) == 0:  # the two parts in programs of their own, side by side
            lat_row = lat_ptr + blk * s_l0 + layer * s_l1 + off * s_l2
            ty = lat_ptr.dtype.element_ty
            # MLA latent entry: rms_norm(latent) ‖ rope(k_rope), interleaved
            offs_l = tl.arange(0, LAT)
            x = tl.load(kv_ptr + r64[:, None] * s_kv + offs_l[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / LAT + kv_eps)
            n = (x * rstd[:, None]).to(kv_ptr.dtype.element_ty).to(tl.float32)
            y = n * tl.load(nw_ptr + offs_l).to(tl.float32)[None, :]
            tl.store(lat_row[:, None] + offs_l[None, :], y.to(ty), mask=rmask[:, None])
            offs_r = tl.arange(0, 2 * HALF)
            kr = _rotated(
                kv_ptr + r64[:, None] * s_kv + LAT,
                cos_ptr + r64[:, None] * s_c,
                sin_ptr + r64[:, None] * s_s,
                rows,
                rmask,
                offs_r,
                HALF,
                True,
                False,
                rstd,
                rstd,
                nw_ptr,
                nw_ptr,
                k_ptr.dtype.element_ty,
            )
            tl.store(lat_row[:, None] + LAT + offs_r[None, :], kr.to(ty), mask=rmask[:, None])
        else:
            # indexer key: layer_norm -> rope of its first 2 IHALF dims (-> Hadamard -> act_quant)
            offs_d = tl.arange(0, D)
            src = k_ptr + r64[:, None] * s_k
            kx = tl.load(src + offs_d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            mean = tl.sum(kx, axis=1) / D
            dev = kx - mean[:, None]
            krstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / D + k_eps)
            key = _rotated(
                src,
                cos_ptr + r64[:, None] * s_c,
                sin_ptr + r64[:, None] * s_s,
                rows,
                rmask,
                offs_d,
                IHALF,
                IDX_INTERLEAVED,
                True,
                mean,
                krstd,
                kw_ptr,
                kb_ptr,
                k_ptr.dtype.element_ty,
            )
            ik_row = ik_ptr + blk * s_i0 + layer * s_i1 + off * s_i2
            if FP8:
                q, sc = _hadamard_e4m3(key, h_ptr, h_scale, offs_d, D, INTERP)
                tl.store(ik_row[:, None] + offs_d[None, :], q.to(ik_ptr.dtype.element_ty), mask=rmask[:, None])
                tl.store(is_ptr + blk * s_is0 + layer * s_is1 + off, sc, mask=rmask)
            else:
                tl.store(ik_row[:, None] + offs_d[None, :], key.to(ik_ptr.dtype.element_ty), mask=rmask[:, None])


def kv_write_fits(kv_a: torch.Tensor, k_idx: torch.Tensor, cos: torch.Tensor, latent: torch.Tensor) -> bool:
    """Shapes the fused kernel serves: a bf16/fp16/fp32 latent pool (not the 656-byte FP8 entries),
    power-of-two latent, rope and indexer key widths, contiguous last dimensions."""
    half, d = cos.shape[-1], k_idx.shape[-1]
    kv_lora = latent.shape[-1] - 2 * half
    return (
        latent.dtype != torch.uint8
        and kv_a.shape[-1] == kv_lora + 2 * half
        and all(is_pow2(v) for v in (kv_lora, half, d))
        and d >= 16
        and kv_a.stride(-1) == 1
        and k_idx.stride(-1) == 1
        and cos.stride(-1) == 1
    )


def kv_write_triton(
    kv_a: torch.Tensor,
    k_idx: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_norm_w: torch.Tensor,
    kv_eps: float,
    k_norm_w: torch.Tensor,
    k_norm_b: torch.Tensor,
    k_eps: float,
    index_rope_interleaved: bool,
    hadamard: torch.Tensor | None,
    latent: torch.Tensor,
    ikeys: torch.Tensor,
    iscale: torch.Tensor | None,
    layer: int,
    slots: torch.Tensor,
) -> None:
    require_triton()
    if not kv_write_fits(kv_a, k_idx, cos, latent):
        raise ValueError("kv_write_triton: shapes outside kv_write_fits (see its docstring)")
    n, half, d = kv_a.shape[0], cos.shape[-1], k_idx.shape[-1]
    if n == 0:
        return
    fp8 = iscale is not None
    if fp8 != (hadamard is not None):
        raise ValueError("the FP8 indexer cache (iscale) takes the Hadamard matrix, the exact one must not")
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    ik = ikeys.view(FP8_DTYPE) if fp8 else ikeys
    isc = iscale if iscale is not None else latent
    h = hadamard.contiguous() if hadamard is not None else kv_norm_w
    block_n = 16
    _kv_write_kernel[(triton.cdiv(n, block_n), 2)](
        kv_a,
        k_idx,
        cos,
        sin,
        kv_norm_w,
        k_norm_w,
        k_norm_b,
        h,
        slots,
        latent,
        ik,
        isc,
        n,
        layer,
        kv_eps,
        k_eps,
        d**-0.5,
        kv_a.stride(0),
        k_idx.stride(0),
        cos.stride(0),
        sin.stride(0),
        latent.stride(0),
        latent.stride(1),
        latent.stride(2),
        ik.stride(0),
        ik.stride(1),
        ik.stride(2),
        isc.stride(0) if fp8 else 0,
        isc.stride(1) if fp8 else 0,
        BS=latent.shape[2],
        LAT=latent.shape[-1] - 2 * half,
        HALF=half,
        D=d,
        IHALF=half,
        BLOCK_N=block_n,
        IDX_INTERLEAVED=index_rope_interleaved,
        FP8=fp8,
        INTERP=interpreting(_kv_write_kernel),
        num_warps=4,
        **pdl(_kv_write_kernel, kv_a),
    )


def kv_write(
    kv_a: torch.Tensor,
    k_idx: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_norm_w: torch.Tensor,
    kv_eps: float,
    k_norm_w: torch.Tensor,
    k_norm_b: torch.Tensor,
    k_eps: float,
    index_rope_interleaved: bool,
    hadamard: torch.Tensor | None,
    latent: torch.Tensor,
    ikeys: torch.Tensor,
    iscale: torch.Tensor | None,
    layer: int,
    slots: torch.Tensor,
) -> None:
    """Normalise, rotate, quantise and write N tokens' cache entries for one layer (module docstring).

    Args:
        kv_a: [N, kv_lora + rope] kv_a_proj_with_mqa's output (latent before its norm ‖ k_rope before rope).
        k_idx: [N, D] the indexer's wk output (before k_norm).
        cos, sin: [N, rope / 2] (RotaryTable.cos_sin); the indexer rotates its first `rope` dims.
        kv_norm_w, kv_eps: kv_a_layernorm's weight [kv_lora] and eps.
        k_norm_w, k_norm_b, k_eps: the indexer's k_norm (LayerNorm) weight, bias [D] and eps.
        index_rope_interleaved: the indexer's rope layout (ModelConfig.indexer_rope_interleave).
        hadamard: the [D, D] ±1 Hadamard matrix in k_idx's dtype for the FP8 indexer, else None.
        latent, ikeys, iscale: the pools (engine/cache.py layouts); iscale None for the exact indexer.
        layer: the pools' layer index; slots: [N] int64 block id * block_size + offset.
    """
    if (iscale is None) != (hadamard is None):
        raise ValueError("the FP8 indexer cache (iscale) takes the Hadamard matrix, the exact one must not")
    fits = use_triton(kv_a) and kv_write_fits(kv_a, k_idx, cos, latent)
    fn = kv_write_triton if fits else kv_write_ref
    fn(
        kv_a,
        k_idx,
        cos,
        sin,
        kv_norm_w,
        kv_eps,
        k_norm_w,
        k_norm_b,
        k_eps,
        index_rope_interleaved,
        hadamard,
        latent,
        ikeys,
        iscale,
        layer,
        slots,
    )
