"""Sparse MLA decode in the absorbed form, over the PAGED latent cache (FlashMLA-style sparse decode).

Cache layout (engine/cache.py, block-major)::

    latent  [num_blocks, num_layers, block_size, kv_lora_rank + qk_rope_head_dim]   (bf16; 512 + 64)
            entry = [normalised latent (512) ‖ rotated k_rope (64)]

For each row b (one query token) and head h, over the selected positions p = indices[b, j] >= 0
(entries latent[block_tables[b, p // block_size], layer, p % block_size])::

    logit(h, p) = (q_lat[b, h] . lat[p] + q_rope[b, h] . k_rope[p]) * softmax_scale
    o_lat[b, h] = sum_p softmax_p(logit(h, p)) * lat[p]

FP8 latent cache (engine/cache.py `latent_fp8`; FlashMLA's sparse FP8 token format): the pool is
uint8 [num_blocks, num_layers, block_size, token_bytes] and each entry is

    Dl e4m3 values | Dl / G fp32 scales (G = min(128, Dl)) | Dr bf16 rope values
    (512 + 16 + 128 = 656 bytes for DeepSeek-V3.2)

read in place: lat[p] = cast_to_q_dtype(e4m3 * scale of its group), k_rope[p] = bf16 -> q's dtype
(exactly what CachePool's unpacking gives the model's other path), then the same attention.

q_lat is q_nope folded through kv_b_proj's k part (W_uk); the caller applies W_uv to o_lat.
Softmax is computed online in fp32; P is rounded to the cache dtype before the P.V product, as in
model.attention.MLA._absorbed. A row with no valid index gets zeros.

Triton version: one program per (row, 64-head group, split of the top-k list); each loads its
queries once, gathers BLOCK_N selected entries per step (1152 contiguous bytes each) and runs
two tensor-core dots per step; splits (flash-decoding) keep the GPU busy at small batch and a
second kernel merges them by their log-sum-exp. A row's head groups are neighbours in the launch
order (they share its gathered entries through L2). `prefetch=True` resolves the next tile's entry
offsets while the current one is multiplied (FP8 entries: on by default, 291 -> 204 us at 64 rows on
an H100; bf16: slower, off). Splits fill the SMs once (bench/results/kernels-h100-run2.json).

On Hopper, bf16 entries go to the Gluon kernel of sparse_mla_hopper.py (same launcher, splits and
merge): the compiler's choices for this kernel (both warp groups computing the whole Q.K^T tile,
all 255 registers a thread, spilling under triton 3.9) cost it 1.35-1.4x (bench/results/sparse-mla-h100).
"""

from __future__ import annotations

import math

import torch

from ._common import HAS_TRITON, interpreting, pdl, pdl_start, require_triton, tl, triton, use_triton
from .sparse_mla_hopper import SMEM_LIMIT, smem_bytes, wgmma_fits, ws_smem_bytes


def fp8_token_bytes(dl: int, dr: int) -> int:
    """Bytes of one FP8 cache entry: dl e4m3 + one fp32 scale per min(128, dl) + dr bf16."""
    return dl + 4 * (dl // min(128, dl)) + 2 * dr


def unpack_fp8_entries(raw: torch.Tensor, dl: int, dr: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., token_bytes] FP8 entries -> [..., dl + dr] in dtype (latent = e4m3 * its group's scale)."""
    g = min(128, dl)
    ng = dl // g
    lead = raw.shape[:-1]
    raw = raw.reshape(-1, raw.shape[-1])
    q = raw[:, :dl].contiguous().view(torch.float8_e4m3fn).float()
    scale = raw[:, dl : dl + 4 * ng].contiguous().view(torch.float32)
    rope = raw[:, dl + 4 * ng : dl + 4 * ng + 2 * dr].contiguous().view(torch.bfloat16)
    nope = (q.view(-1, ng, g) * scale[:, :, None]).view(-1, dl)
    return torch.cat([nope.to(dtype), rope.to(dtype)], dim=-1).view(*lead, dl + dr)


def _check(
    q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor, indices: torch.Tensor
) -> None:
    if q_lat.dim() != 3 or q_rope.shape[:2] != q_lat.shape[:2]:
        raise ValueError(
            f"q_lat [B, H, Dl] and q_rope [B, H, Dr] must agree; got {tuple(q_lat.shape)}, {tuple(q_rope.shape)}"
        )
    if latent.dtype == torch.uint8:
        want = fp8_token_bytes(q_lat.shape[-1], q_rope.shape[-1])
        if latent.dim() != 4 or latent.shape[-1] != want or q_lat.shape[-1] % min(128, q_lat.shape[-1]):
            raise ValueError(
                f"an FP8 latent pool must be uint8 [num_blocks, num_layers, block_size, {want}], "
                f"got {tuple(latent.shape)}"
            )
    elif latent.dim() != 4 or latent.shape[-1] < q_lat.shape[-1] + q_rope.shape[-1]:
        raise ValueError(f"latent must be [num_blocks, num_layers, block_size, Dl + Dr], got {tuple(latent.shape)}")
    if indices.dim() != 2 or indices.shape[0] != q_lat.shape[0] or block_tables.shape[0] != q_lat.shape[0]:
        raise ValueError("indices [B, topk] and block_tables [B, max_blocks] must match q's batch")


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def sparse_mla_decode_ref(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    _check(q_lat, q_rope, latent, block_tables, indices)
    dl, dr = q_lat.shape[-1], q_rope.shape[-1]
    bs = latent.shape[2]
    valid = indices >= 0
    idx = indices.long().clamp(min=0)
    blk = block_tables.long().gather(1, (idx // bs).clamp(max=block_tables.shape[1] - 1))
    ent = latent[blk.clamp(0, latent.shape[0] - 1), layer, idx % bs]  # [B, K, Dl + Dr]
    if latent.dtype == torch.uint8:
        ent = unpack_fp8_entries(ent, dl, dr, q_lat.dtype)
    lat, rope = ent[..., :dl], ent[..., dl : dl + dr]
    logits = (
        torch.einsum("bhc,bkc->bhk", q_lat.float(), lat.float())
        + torch.einsum("bhr,bkr->bhk", q_rope.float(), rope.float())
    ) * softmax_scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0).to(lat.dtype)  # all-masked rows -> 0
    return torch.einsum("bhk,bkc->bhc", p.float(), lat.float()).to(q_lat.dtype)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _entry_offsets(pos, bt_ptr, b, layer, s_bt, s_l0, s_l1, s_l2, BS: tl.constexpr):
        """Sequence positions (-1 = skip) -> offsets of their entries in the pool, and which are valid."""
        valid = pos >= 0
        pos = tl.where(valid, pos, 0)
        blk = tl.load(bt_ptr + b * s_bt + pos // BS, mask=valid, other=0).to(tl.int64)
        return blk * s_l0 + layer * s_l1 + (pos % BS) * s_l2, valid

    @triton.jit
    def _sparse_mla_kernel(
        ql_ptr,
        qr_ptr,
        lat_ptr,
        sc_ptr,
        rp_ptr,
        bt_ptr,
        idx_ptr,
        o_ptr,
        lse_ptr,
        layer,
        topk,
        qk_scale,
        split_len,
        s_qlb,
        s_qlh,
        s_qrb,
        s_qrh,
        s_l0,
        s_l1,
        s_l2,
        s_bt,
        s_ib,
        s_ob,
        s_oh,
        s_os,
        s_lb,
        s_lh,
        DL: tl.constexpr,
        DR: tl.constexpr,
        BS: tl.constexpr,
        GROUPS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MULTI: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        PREFETCH: tl.constexpr,
        FP8: tl.constexpr,
        SCAN: tl.constexpr,
        G: tl.constexpr,
        NG: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        # a row's head groups are neighbours in launch order: they run together and share the row's
        # gathered entries through L2 (prefill launches many waves of rows)
        pid = tl.program_id(0)
        b = pid // GROUPS
        heads = (pid % GROUPS) * BLOCK_H + tl.arange(0, BLOCK_H)
        sp = tl.program_id(1)
        offs_dl = tl.arange(0, DL)
        offs_dr = tl.arange(0, DR)
        offs_t = tl.arange(0, BLOCK_N)
        ql = tl.load(ql_ptr + b * s_qlb + heads[:, None] * s_qlh + offs_dl[None, :])
        qr = tl.load(qr_ptr + b * s_qrb + heads[:, None] * s_qrh + offs_dr[None, :])
        if UPCAST:
            ql = ql.to(tl.float32)
            qr = qr.to(tl.float32)
        m = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, DL], tl.float32)
        start = sp * split_len
        end = tl.minimum(start + split_len, topk)
        # PREFETCH: a software pipeline over the index chain. Tile i's entry offsets were computed in
        # iteration i-1 (from positions loaded in i-2), so no dependent load (position -> block table
        # -> entry) stands in front of a tile's gather; without it each tile resolves its own offsets.
        if PREFETCH:
            pos = tl.load(idx_ptr + b * s_ib + start + offs_t, mask=start + offs_t < end, other=-1)
            off, valid = _entry_offsets(pos, bt_ptr, b, layer, s_bt, s_l0, s_l1, s_l2, BS)
            pos = tl.load(idx_ptr + b * s_ib + start + BLOCK_N + offs_t, mask=start + BLOCK_N + offs_t < end, other=-1)
        # tiles past the split's last selected position hold nothing (short rows, prefill rows near
        # the start, contexts under top-k: their -1 padding trails): the loop stops there
        last = start - 1
        for c0 in range(start, end, SCAN):
            j = c0 + tl.arange(0, SCAN)
            pj = tl.load(idx_ptr + b * s_ib + j, mask=j < end, other=-1)
            last = tl.maximum(last, tl.max(tl.where(pj >= 0, j, -1), axis=0))
        for n0 in range(start, last + 1, BLOCK_N):
            if PREFETCH:
                off_next, valid_next = _entry_offsets(pos, bt_ptr, b, layer, s_bt, s_l0, s_l1, s_l2, BS)
                ahead = n0 + 2 * BLOCK_N + offs_t
                pos = tl.load(idx_ptr + b * s_ib + ahead, mask=ahead < end, other=-1)
            else:
                cur = tl.load(idx_ptr + b * s_ib + n0 + offs_t, mask=n0 + offs_t < end, other=-1)
                off, valid = _entry_offsets(cur, bt_ptr, b, layer, s_bt, s_l0, s_l1, s_l2, BS)
            row = lat_ptr + off
            if FP8:  # 656-byte entry: e4m3 values | fp32 scale per G | bf16 rope (off counts bytes)
                kq = tl.load(row[:, None] + offs_dl[None, :], mask=valid[:, None], other=0)
                kf = kq.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                # each column's group scale, selected in registers (the tile keeps its layout)
                grp = offs_dl // G
                scol = tl.zeros([BLOCK_N, DL], tl.float32)
                for g in tl.static_range(NG):
                    s_g = tl.load(sc_ptr + off // 4 + DL // 4 + g, mask=valid, other=0.0)
                    scol = tl.where(grp[None, :] == g, s_g[:, None], scol)
                kl = (kf * scol).to(ql_ptr.dtype.element_ty)
                kr = tl.load(
                    rp_ptr + (off // 2 + (DL + 4 * NG) // 2)[:, None] + offs_dr[None, :], mask=valid[:, None], other=0.0
                ).to(ql_ptr.dtype.element_ty)
            else:
                kl = tl.load(row[:, None] + offs_dl[None, :], mask=valid[:, None], other=0.0)
                kr = tl.load(row[:, None] + DL + offs_dr[None, :], mask=valid[:, None], other=0.0)
            if UPCAST:
                kl = kl.to(tl.float32)
                kr = kr.to(tl.float32)
            if IEEE:
                s = tl.dot(ql, tl.trans(kl), input_precision="ieee")
                s = tl.dot(qr, tl.trans(kr), s, input_precision="ieee")
            else:
                s = tl.dot(ql, tl.trans(kl))
                s = tl.dot(qr, tl.trans(kr), s)
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p.to(kl.dtype), kl, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(kl.dtype), kl, acc)
            m = m_new
            if PREFETCH:
                off = off_next
                valid = valid_next
        safe_l = tl.where(l > 0.0, l, 1.0)
        out = acc / safe_l[:, None]
        o_ptrs = o_ptr + b * s_ob + heads[:, None] * s_oh + sp * s_os + offs_dl[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
        if MULTI:
            lse = tl.where(l > 0.0, m + tl.log2(safe_l), float("-inf"))
            tl.store(lse_ptr + b * s_lb + heads * s_lh + sp, lse)

    @triton.jit
    def _merge_splits_kernel(
        part_ptr,
        lse_ptr,
        o_ptr,
        s_pb,
        s_ph,
        s_ps,
        s_lb,
        s_lh,
        s_ob,
        s_oh,
        DL: tl.constexpr,
        SPLITS: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, DL)
        lse = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_s)
        mx = tl.max(lse, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(lse - mx)
        tot = tl.sum(w, axis=0)
        w = w / tl.where(tot > 0.0, tot, 1.0)
        part = tl.load(part_ptr + b * s_pb + h * s_ph + offs_s[:, None] * s_ps + offs_d[None, :])
        out = tl.sum(part * w[:, None], axis=0)
        tl.store(o_ptr + b * s_ob + h * s_oh + offs_d, out.to(o_ptr.dtype.element_ty))


WGMMA = True  # the Hopper kernels where they fit (bench/engine.py --mla-kernel triton turns them off)
#: of the Hopper kernels, the warp-specialised one (64-position tiles; bench/engine.py --mla-kernel wgmma: the other)
WARP_SPECIALIZED = True


def _num_splits(bsz: int, head_groups: int, topk: int, block_n: int, sms: int = 132) -> int:
    # one CTA per SM fits (registers): fill the SMs once; more splits only add merge work
    # (H100, bench shapes: B=64 one split 197 us vs two 225 us; B=1 32 splits 23 us vs 16 27 us)
    splits = 1
    max_splits = max(1, topk // block_n)
    while splits < max_splits and bsz * head_groups * splits * 2 <= sms:
        splits *= 2
    return splits


def sparse_mla_decode_triton(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    *,
    block_h: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 8,
    num_stages: int = 2,
    prefetch: bool | None = None,
    wgmma: bool | None = None,
    warp_specialized: bool | None = None,
) -> torch.Tensor:
    """The Triton kernel, or with `wgmma` (default: where it fits, i.e. bf16 entries on Hopper) a
    Gluon one of kernels/sparse_mla_hopper.py: the warp-specialised kernel (`warp_specialized`, default
    WARP_SPECIALIZED, 64-position tiles) or the pipelined one, whose `num_stages` is the tiles in flight.
    The warp-specialised kernel splits top-k in whole pairs of tiles: `num_splits` is rounded to that (fewer
    splits than asked where top-k / num_splits is not a multiple of 128)."""
    require_triton()
    _check(q_lat, q_rope, latent, block_tables, indices)
    bsz, heads, dl = q_lat.shape
    dr = q_rope.shape[-1]
    topk = indices.shape[1]
    bs = latent.shape[2]
    if latent.stride(3) != 1 or q_lat.stride(2) != 1 or q_rope.stride(2) != 1 or indices.stride(1) != 1:
        raise ValueError("latent, q_lat, q_rope and indices need a contiguous last dimension")
    # the Hopper kernels: 64 heads a program; the warp-specialised one 64 positions a tile, the pipelined one
    # its tiles x stages within shared memory
    hopper = wgmma_fits(q_lat, q_rope, latent) and block_h in (None, 64)
    ws_fits = hopper and block_n in (None, 64) and ws_smem_bytes() <= SMEM_LIMIT
    piped_fits = hopper and smem_bytes(block_n or 64, num_stages) <= SMEM_LIMIT
    want_ws = WARP_SPECIALIZED if warp_specialized is None else warp_specialized
    if warp_specialized and wgmma is False:
        raise ValueError("warp_specialized=True is a Hopper kernel: it needs wgmma True or None")
    if wgmma is None:  # an explicit warp_specialized=True asks for that kernel whatever the module switch
        wgmma = ws_fits if warp_specialized else WGMMA and (piped_fits or want_ws and ws_fits)
    ws = wgmma and want_ws and ws_fits
    if wgmma and not (ws or piped_fits) or warp_specialized and not ws:
        raise ValueError(
            "the wgmma kernels need bf16 entries on a Hopper GPU, 16-byte aligned tensors and strides, a multiple "
            f"of 64 heads, Dl 512, Dr 64, block_h 64 and (warp-specialised) block_n 64 or (pipelined) tiles x "
            f"stages within shared memory (block_n {block_n}, stages {num_stages})"
        )
    block_h = block_h or min(64, heads)
    # FP8 entries: 64 a tile with the offsets one tile ahead (PREFETCH) measured best on an H100
    # (206 us at 64 rows vs 291 for 32 a tile without; bench/results/sparse-mla-h100); bf16 entries
    # in the Triton kernel: without (181 vs 265 us)
    block_n = block_n or 64
    if prefetch is None:
        prefetch = latent.dtype == torch.uint8
    if heads % block_h or block_h < 16 or dl & (dl - 1) or dr & (dr - 1):
        raise ValueError(f"heads {heads} must be a multiple of block_h {block_h} >= 16; Dl, Dr powers of two")
    groups = heads // block_h
    sms = torch.cuda.get_device_properties(q_lat.device).multi_processor_count if q_lat.is_cuda else 132
    # the warp-specialised kernel takes tiles in pairs (one a computing group): splits of whole pairs, or a
    # one-tile split would leave a group idle (at batch 1: 16 splits of 128 positions rather than 32 of 64)
    unit = 2 * block_n if ws else block_n
    splits = num_splits or _num_splits(bsz, groups, topk, unit, sms)
    split_len = triton.cdiv(triton.cdiv(topk, splits), unit) * unit
    splits = triton.cdiv(topk, split_len)
    splits_p2 = 1 << (splits - 1).bit_length()
    out = torch.empty(bsz, heads, dl, device=q_lat.device, dtype=q_lat.dtype)
    if splits_p2 == 1:
        part, lse = out, out
        s_o = (out.stride(0), out.stride(1), 0)
    else:
        # unused split slots (splits < splits_p2) keep lse = -inf and weigh nothing in the merge
        alloc = torch.empty if splits == splits_p2 else torch.zeros
        part = alloc(bsz, heads, splits_p2, dl, device=q_lat.device, dtype=torch.float32)
        lse = torch.empty(bsz, heads, splits_p2, device=q_lat.device, dtype=torch.float32)
        if splits < splits_p2:
            lse.fill_(float("-inf"))
        s_o = (part.stride(0), part.stride(1), part.stride(2))
    grid = (bsz * groups, splits)
    # both kernels take (q_lat, q_rope, latent, [Triton: the FP8 views,] block tables, indices) then these
    rest = (
        block_tables,
        indices,
        part,
        lse,
        layer,
        topk,
        softmax_scale * math.log2(math.e),
        split_len,
        q_lat.stride(0),
        q_lat.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        latent.stride(0),
        latent.stride(1),
        latent.stride(2),
        block_tables.stride(0),
        indices.stride(0),
        *s_o,
        lse.stride(0) if splits_p2 > 1 else 0,
        lse.stride(1) if splits_p2 > 1 else 0,
    )
    shape = dict(
        DL=dl,
        DR=dr,
        BS=bs,
        GROUPS=groups,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        MULTI=splits_p2 > 1,
        SCAN=min(1024, triton.next_power_of_2(split_len)),
    )
    if ws:
        from . import sparse_mla_hopper as H

        # 4 warps of its own (the gathering group) + 2 computing groups of 4 (warp_specialize)
        H._sparse_mla_ws_kernel[grid](
            q_lat, q_rope, latent, *rest, **shape, OVERLAP=H.WS_OVERLAP, num_warps=4, maxnreg=H.WS_MAXNREG
        )
    elif wgmma:
        from .sparse_mla_hopper import _sparse_mla_wgmma_kernel

        _sparse_mla_wgmma_kernel[grid](q_lat, q_rope, latent, *rest, **shape, STAGES=num_stages, num_warps=8)
    else:
        fp8 = latent.dtype == torch.uint8
        # the FP8 entry's scales and rope, addressed as fp32 / bf16 elements of the same bytes
        sc, rp = (latent.view(torch.float32), latent.view(torch.bfloat16)) if fp8 else (latent, latent)
        _sparse_mla_kernel[grid](
            q_lat,
            q_rope,
            latent,
            sc,
            rp,
            *rest,
            **shape,
            UPCAST=interpreting(_sparse_mla_kernel),
            IEEE=q_lat.dtype == torch.float32,
            PREFETCH=prefetch,
            FP8=fp8,
            G=min(128, dl),
            NG=dl // min(128, dl),
            num_warps=num_warps,
            num_stages=num_stages,
            **pdl(_sparse_mla_kernel, q_lat),
        )
    if splits_p2 > 1:
        _merge_splits_kernel[(bsz, heads)](
            part,
            lse,
            out,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            DL=dl,
            SPLITS=splits_p2,
            num_warps=4,
            **pdl(_merge_splits_kernel, part),
        )
    return out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def sparse_mla_decode(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Absorbed-form MLA over the selected cache entries only.

    Args:
        q_lat: [B, H, kv_lora_rank] (512) queries in latent space (q_nope . W_uk), bf16.
        q_rope: [B, H, qk_rope_head_dim] (64) rotated rope queries (cache's de-interleaved order).
        latent: [num_blocks, num_layers, block_size, kv_lora_rank + qk_rope_head_dim] the latent pool
            (q's dtype), or the FP8 pool: uint8 [..., 656] (e4m3 latent | fp32 scale per 128 | bf16 rope).
        layer: which layer's slice of the pool.
        block_tables: [B, max_blocks] int32 physical block ids.
        indices: [B, topk] int32 sequence positions to attend to; -1 entries are skipped
            (indexer_topk_decode's output).
        softmax_scale: the MLA softmax scale (qk_head_dim^-0.5 times YaRN's mscale^2).
    Returns:
        o_lat [B, H, kv_lora_rank] in q_lat's dtype (apply W_uv, then o_proj).
    The Triton kernel serves CUDA tensors with >= 16 heads (a multiple of 64 beyond) and
    power-of-two head dims; other shapes (small test presets) run the reference.
    """
    heads, dl, dr = q_lat.shape[1], q_lat.shape[2], q_rope.shape[2]
    fits = heads % min(64, heads) == 0 and heads >= 16 and not (dl & (dl - 1) or dr & (dr - 1))
    fn = sparse_mla_decode_triton if use_triton(q_lat) and fits else sparse_mla_decode_ref
    return fn(q_lat, q_rope, latent, layer, block_tables, indices, softmax_scale)
