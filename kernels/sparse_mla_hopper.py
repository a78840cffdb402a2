"""Sparse MLA decode on Hopper tensor cores (Gluon: explicit layouts, cp.async gathers, wgmma).

Same contract as kernels/sparse_mla.py (absorbed form over the paged bf16 latent cache, top-k positions
per row, splits merged by log-sum-exp), written in Gluon because the Triton kernel cannot be steered
where it loses: the compiler places both warp groups on the whole Q.K^T tile (each computes all of it,
twice the tensor work of that half) and uses all 255 registers a thread (the 64 x 512 fp32 output plus
the gather's addresses; triton 3.9 also spills ~360 bytes). Two kernels, per program one row, 64 heads
and one split:

The warp-specialised kernel (`_sparse_mla_ws_kernel`, the default; the scheme of FlashMLA's sm90 sparse
kernels): a gathering warp group and two computing ones, which take alternate 64-position tiles. Each
computing group scores its own tiles alone and owns half of the 512 output columns, so a tile's P.V is
done half by the group that scored it (P from registers) and half by the other (P through shared memory);
the groups agree the row max once per pair of tiles; each quarter of the tile buffers is refilled as
soon as its last reader is done (mbarriers), so gathers, Q.K^T, softmax and P.V of the two groups
overlap without a block-wide barrier. Layout comment above the kernel.

The pipelined kernel (`_sparse_mla_wgmma_kernel`): all 8 warps on every tile in turn:

* Q (64 x 512 latent + 64 x 64 rope) sits in shared memory for the whole program (wgmma's A operand);
* the selected entries are gathered tile by tile (BLOCK_N positions: 1152 contiguous bytes each) with
  16-byte cp.async straight into swizzled shared memory, STAGES tiles in flight; the chain
  position -> block table -> entry address runs one tile ahead in registers, so no dependent load
  stands in front of a gather;
* S = Q.K^T is one wgmma over the tile with the two warp groups on different halves of the tile's
  positions (no duplicated work); the softmax row statistics are combined across them;
* O += P.V is one wgmma with each warp group owning half of the 512 output columns (FlashMLA's split
  of the value dimension), P passed in registers; O stays in registers (128 per thread).

The caller (sparse_mla.sparse_mla_decode_triton, wgmma=True or by default where wgmma_fits) handles splits
and the merge. Hopper (sm_90) with bf16 entries only; FP8 entries and other GPUs use the Triton kernel.
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )

    HAS_GLUON = True
except ImportError:  # pragma: no cover - Triton without Gluon (or no Triton at all)
    HAS_GLUON = False


SMEM_LIMIT = 232448  # bytes of shared memory a block may use on H100 / H200 (227 KB)


def smem_bytes(block_n: int, stages: int, dl: int = 512, dr: int = 64) -> int:
    """Shared memory of one program: Q (64 heads), `stages` tiles of entries and positions, and the
    ~4 KB the compiler adds for layout changes (equal to what it reported for (64, 2), (32, 3), (32, 4))."""
    return 2 * 64 * (dl + dr) + stages * block_n * (2 * (dl + dr) + 4) + 4096


def aligned_16(*tensors: torch.Tensor) -> bool:
    """Whether the tensors' 16-byte cp.async gathers are legal: each starts 16-byte aligned and every stride
    but the last (unit) one is a multiple of 16 elements (what the JIT specialises on; with less it cannot
    prove the alignment and refuses to compile the 16-byte copies)."""
    return all(t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def wgmma_fits(q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor) -> bool:
    """Whether the Hopper kernels serve these tensors (else the Triton kernel does)."""
    if not (HAS_GLUON and q_lat.is_cuda and latent.dtype == torch.bfloat16 and q_lat.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(q_lat.device)[0] != 9:
        return False
    heads, dl, dr = q_lat.shape[1], q_lat.shape[2], q_rope.shape[2]
    # the widths they were tested and measured at (DeepSeek-V3.2's); others take the Triton kernel
    widths = heads % 64 == 0 and dl == 512 and dr == 64 and latent.shape[-1] == dl + dr
    return widths and aligned_16(q_lat, q_rope, latent)


if HAS_GLUON:

    @gluon.jit
    def _program_split(topk, split_len, GROUPS: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
        """This program's (row, first head, split, the split's positions start..end, its first tile)."""
        pid = gl.program_id(0)
        sp = gl.program_id(1)
        start = sp * split_len
        end = gl.minimum(start + split_len, topk)
        return pid // GROUPS, (pid % GROUPS) * BLOCK_H, sp, start, end, start // BLOCK_N  # split_len: BLOCK_N's

    @gluon.jit
    def _last_selected(idx_ptr, b, s_ib, start, end, SCAN: gl.constexpr, layout: gl.constexpr):
        """The split's last selected position (start - 1 if none). Tiles past it hold nothing (short rows,
        prefill rows near the start, contexts under top-k: their -1 padding trails)."""
        last = start - 1
        for c0 in range(start, end, SCAN):
            j = c0 + gl.arange(0, SCAN, layout=layout)
            pj = gl.load(idx_ptr + b * s_ib + j, mask=j < end, other=-1)
            last = gl.maximum(last, gl.max(gl.where(pj >= 0, j, -1), axis=0))
        return last

    @gluon.jit
    def _lse(m, l):
        """log2 of the softmax denominator at running max m (base-2 units), -inf where nothing was selected."""
        return gl.where(l > 0.0, m + gl.log2(gl.where(l > 0.0, l, 1.0)), float("-inf"))

    @gluon.jit
    def _blocks(pos, bt_ptr, b, s_bt, BS: gl.constexpr):
        """Positions (-1 = skip) -> (their blocks' ids from the row's block table, valid)."""
        ok = pos >= 0
        return gl.load(bt_ptr + b * s_bt + gl.where(ok, pos, 0) // BS, mask=ok, other=0), ok

    @gluon.jit
    def _offsets(blk, pos, ok, layer, s_l0, s_l1, s_l2, BS: gl.constexpr):
        """Blocks and positions -> the entries' offsets in the pool."""
        return blk.to(gl.int64) * s_l0 + layer * s_l1 + (gl.where(ok, pos, 0) % BS).to(gl.int64) * s_l2

    @gluon.jit
    def _tile_offsets(
        idx_ptr, bt_ptr, b, t, end, layer, s_ib, s_bt, s_l0, s_l1, s_l2,
        BS: gl.constexpr, BLOCK_N: gl.constexpr, layout: gl.constexpr,
    ):  # fmt: skip
        """Positions of tile t (synchronously) -> (entry offsets, valid): used outside the main loop."""
        offs = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=layout)
        pos = gl.load(idx_ptr + b * s_ib + offs, mask=offs < end, other=-1)
        blk, ok = _blocks(pos, bt_ptr, b, s_bt, BS)
        return _offsets(blk, pos, ok, layer, s_l0, s_l1, s_l2, BS), ok

    @gluon.jit
    def _issue(lat_ptr, idx_ptr, b, s_ib, t, end, off_l, ok_l, off_r, ok_r, kl_buf, kr_buf, pos_buf,
               DL: gl.constexpr, DR: gl.constexpr, BLOCK_N: gl.constexpr, gather_l: gl.constexpr,
               gather_r: gl.constexpr, pos_l: gl.constexpr):  # fmt: skip
        """cp.async of tile t's entries (latent part, rope part) and positions into one stage."""
        cols = gl.arange(0, DL, layout=gl.SliceLayout(0, gather_l))
        ptr = lat_ptr + off_l[:, None] + cols[None, :]
        cp.async_copy_global_to_shared(kl_buf, ptr, mask=ok_l[:, None])
        cols_r = gl.arange(0, DR, layout=gl.SliceLayout(0, gather_r))
        ptr_r = lat_ptr + off_r[:, None] + DL + cols_r[None, :]
        cp.async_copy_global_to_shared(kr_buf, ptr_r, mask=ok_r[:, None])
        offs = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=pos_l)
        cp.async_copy_global_to_shared(pos_buf, idx_ptr + b * s_ib + offs, mask=offs < end)

    @gluon.jit
    def _sparse_mla_wgmma_kernel(
        ql_ptr, qr_ptr, lat_ptr, bt_ptr, idx_ptr, o_ptr, lse_ptr,
        layer, topk, qk_scale, split_len,
        s_qlb, s_qlh, s_qrb, s_qrh, s_l0, s_l1, s_l2, s_bt, s_ib, s_ob, s_oh, s_os, s_lb, s_lh,
        DL: gl.constexpr, DR: gl.constexpr, BS: gl.constexpr, GROUPS: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MULTI: gl.constexpr, SCAN: gl.constexpr,
    ):  # fmt: skip
        gl.static_assert(gl.num_warps() == 8, "two warp groups")
        gl.static_assert(BLOCK_H == 64, "64 heads a program (wgmma M)")
        # S [64 heads, BLOCK_N]: the two warp groups take different position halves; O [64, DL]: different
        # column halves; P enters the O wgmma from registers
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, DL // 2, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        # gathers: 16-byte vectors, a warp on one entry's row at a time
        gather_l: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])
        gather_r: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (DR // 8), DR // 8], [8, 1], [1, 0])
        row_l: gl.constexpr = gl.SliceLayout(1, gather_l)
        row_r: gl.constexpr = gl.SliceLayout(1, gather_r)
        pos_l: gl.constexpr = gl.BlockedLayout([1], [32], [8], [0])
        pos_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

        b, h0, sp, start, end, t0 = _program_split(topk, split_len, GROUPS, BLOCK_H, BLOCK_N)

        # Q into shared memory, once
        hq = h0 + gl.arange(0, BLOCK_H, layout=row_l)
        cq = gl.arange(0, DL, layout=gl.SliceLayout(0, gather_l))
        q_smem = gl.allocate_shared_memory(
            gl.bfloat16, [BLOCK_H, DL], smem_l, gl.load(ql_ptr + b * s_qlb + hq[:, None] * s_qlh + cq[None, :])
        )
        hr = h0 + gl.arange(0, BLOCK_H, layout=row_r)
        cr = gl.arange(0, DR, layout=gl.SliceLayout(0, gather_r))
        qr_smem = gl.allocate_shared_memory(
            gl.bfloat16, [BLOCK_H, DR], smem_l, gl.load(qr_ptr + b * s_qrb + hr[:, None] * s_qrh + cr[None, :])
        )
        kl_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, DL], smem_l)
        kr_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, DR], smem_l)
        pos_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], pos_sl)

        # prologue: tiles 0 .. STAGES-2 in flight, tile STAGES-1's offsets and tile STAGES's positions ready
        for pre in gl.static_range(STAGES - 1):
            o_l, v_l = _tile_offsets(
                idx_ptr, bt_ptr, b, t0 + pre, end, layer, s_ib, s_bt, s_l0, s_l1, s_l2, BS, BLOCK_N, row_l
            )
            o_r, v_r = _tile_offsets(
                idx_ptr, bt_ptr, b, t0 + pre, end, layer, s_ib, s_bt, s_l0, s_l1, s_l2, BS, BLOCK_N, row_r
            )
            _issue(lat_ptr, idx_ptr, b, s_ib, t0 + pre, end, o_l, v_l, o_r, v_r, kl_smem.index(pre), kr_smem.index(pre),
                   pos_smem.index(pre), DL, DR, BLOCK_N, gather_l, gather_r, pos_l)  # fmt: skip
            cp.commit_group()
        off_l, ok_l = _tile_offsets(
            idx_ptr, bt_ptr, b, t0 + STAGES - 1, end, layer, s_ib, s_bt, s_l0, s_l1, s_l2, BS, BLOCK_N, row_l
        )
        off_r, ok_r = _tile_offsets(
            idx_ptr, bt_ptr, b, t0 + STAGES - 1, end, layer, s_ib, s_bt, s_l0, s_l1, s_l2, BS, BLOCK_N, row_r
        )
        nxt_l = (t0 + STAGES) * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_l)
        pos_nl = gl.load(idx_ptr + b * s_ib + nxt_l, mask=nxt_l < end, other=-1)
        nxt_r = (t0 + STAGES) * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_r)
        pos_nr = gl.load(idx_ptr + b * s_ib + nxt_r, mask=nxt_r < end, other=-1)

        last = _last_selected(idx_ptr, b, s_ib, start, end, SCAN, pos_l)  # scanned while the first tiles load
        n_tiles = gl.cdiv(last + 1 - start, BLOCK_N)

        m = gl.full([BLOCK_H], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
        l = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_H, DL], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
        for i in range(n_tiles):
            # gather tile i + STAGES - 1 into the stage tile i - 1 used (every warp is past it)
            t = t0 + i + STAGES - 1
            st = (i + STAGES - 1) % STAGES
            _issue(lat_ptr, idx_ptr, b, s_ib, t, end, off_l, ok_l, off_r, ok_r, kl_smem.index(st), kr_smem.index(st),
                   pos_smem.index(st), DL, DR, BLOCK_N, gather_l, gather_r, pos_l)  # fmt: skip
            cp.commit_group()
            # the next tile's block ids and the one after's positions load while this tile computes
            blk_nl, ok_nl = _blocks(pos_nl, bt_ptr, b, s_bt, BS)
            blk_nr, ok_nr = _blocks(pos_nr, bt_ptr, b, s_bt, BS)
            ahead_l = (t + 2) * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_l)
            pos_al = gl.load(idx_ptr + b * s_ib + ahead_l, mask=ahead_l < end, other=-1)
            ahead_r = (t + 2) * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_r)
            pos_ar = gl.load(idx_ptr + b * s_ib + ahead_r, mask=ahead_r < end, other=-1)

            cp.wait_group(STAGES - 1)  # this thread's copies of tile i are in
            gl.thread_barrier()  # ... and every thread's
            fence_async_shared()  # visible to the tensor cores
            cur = i % STAGES
            kl = kl_smem.index(cur)
            s = warpgroup_mma(q_smem, kl.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma(qr_smem, kr_smem.index(cur).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            # positions past the split's end were not copied (zeros): the column index says so
            pos = pos_smem.index(cur).load(gl.SliceLayout(0, s_layout))
            col = (t0 + i) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(((pos >= 0) & (col < end))[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m, gl.max(s, axis=1))
            alpha = gl.exp2(m - m_new)
            p = gl.exp2(s - m_new[:, None])
            l = l * alpha + gl.sum(p, axis=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p_op, kl, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            m = m_new
            gl.thread_barrier()  # every warp is done with stage `cur` before it is refilled

            # carry the index chain one tile on
            off_l = _offsets(blk_nl, pos_nl, ok_nl, layer, s_l0, s_l1, s_l2, BS)
            ok_l = ok_nl
            off_r = _offsets(blk_nr, pos_nr, ok_nr, layer, s_l0, s_l1, s_l2, BS)
            ok_r = ok_nr
            pos_nl = pos_al
            pos_nr = pos_ar
        cp.wait_group(0)

        l_o = gl.convert_layout(l, gl.SliceLayout(1, o_layout))
        safe = gl.where(l_o > 0.0, l_o, 1.0)
        out = acc / safe[:, None]
        ho = h0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
        co = gl.arange(0, DL, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + b * s_ob + ho[:, None] * s_oh + sp * s_os + co[None, :], out.to(o_ptr.dtype.element_ty))
        if MULTI:
            hs = h0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
            gl.store(lse_ptr + b * s_lb + hs * s_lh + sp, _lse(m, l))


# ---------------------------------------------------------------------------------------------
# warp-specialised: a gathering warp group and two computing ones that take alternate tiles
# ---------------------------------------------------------------------------------------------
# Shared memory (~217 KB): Q in three parts (latent columns 0-255 "lo", 256-511 "hi", rope "r"); two tile
# buffers w = 0, 1, each split the same way. Computing warp group w takes the tiles 2j + w (buffer w):
# it computes S = Q.K^T of its tile alone (64 heads x 64 positions, no work shared), and its output
# columns are the half of the value dimension it owns (group 0: lo, group 1: hi). So each tile's P.V is
# done half by the group that scored it (P from registers: the "local" product, over the buffer's own
# half) and half by the other group (P passed through shared memory: the "remote" product, over the
# buffer's other half). P of buffer w is written over buffer w's rope part, which only the scoring
# group's Q.K^T reads. The row max is agreed each pair of tiles: group 0 publishes max(m, its tile's max),
# group 1 folds its tile in and publishes the pair's max, group 0 rescales its P and O to it.
# Buffer halves are refilled as soon as their last reader is done: the own half after the local product,
# the other half with the rope part (then P) after the other group's remote product.


def ws_smem_bytes(dl: int = 512, dr: int = 64, block_n: int = 64) -> int:
    """Shared memory of the warp-specialised kernel: Q, two tile buffers, the row statistics, the barriers
    and 256 bytes for alignment and the scan's scratch: 222584, at least the 222528 / 222544 (with splits)
    the compiler reported (triton 3.6, sm_90)."""
    return 2 * 64 * (dl + dr) + 2 * 2 * block_n * (dl + dr) + 4 * 64 * 4 + 15 * 8 + 256


#: registers a thread of the warp-specialised kernel may hold at launch (12 warps: 168 x 384 <= 64K)
WS_MAXNREG = 168
#: of which each computing warp group takes 216 (no spills, triton 3.6 sm_90), the gathering one the rest, 72
WS_REGS = 216
#: each computing group leaves its remote P.V in flight into the next pair's first Q.K^T (else waits for it)
WS_OVERLAP = True


if HAS_GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    # the barriers (one array): which event each index stands for
    _READY_OWN = gl.constexpr(0)  # + w: buffer w's own half is in (its cp.async done); 128 producer arrivals
    _READY_OTH = gl.constexpr(2)  # + w: buffer w's other half and rope part are in; 128 producer arrivals
    _FREE_OWN = gl.constexpr(4)  # + w: group w's local product is done with buffer w's own half
    _FREE_OTH = gl.constexpr(6)  # + w: the other group's remote product is done with buffer w's other half and P
    _Q_READY = gl.constexpr(8)  # Q is in; 128 producer arrivals
    _M_READY = gl.constexpr(9)  # + w: group w published its running max (row w of the stats)
    _P_READY = gl.constexpr(11)  # + w: group w's P is in buffer w's rope part
    _L_READY = gl.constexpr(13)  # + w: group w published its softmax denominator (row 2 + w of the stats)
    _N_BARRIERS = gl.constexpr(15)
    _WS_REGS = gl.constexpr(WS_REGS)

    @gluon.jit
    def _ws_producer(
        lat_ptr, idx_ptr, bt_ptr, ql_ptr, qr_ptr, b, h0, layer, t0, end, n_pairs,
        s_qlb, s_qlh, s_qrb, s_qrh, s_l0, s_l1, s_l2, s_bt, s_ib,
        q_l, q_r, k_lo, k_hi, k_r, bars,
        DL: gl.constexpr, DR: gl.constexpr, BS: gl.constexpr, BLOCK_N: gl.constexpr,
    ):  # fmt: skip
        """Q once, then each pair of tiles: the four buffer parts in the order they free up."""
        HALF: gl.constexpr = DL // 2
        # 16-byte vectors, 8 lanes on a row's 128 bytes, 16 rows a pass
        g: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, g)
        c_half = gl.arange(0, HALF, layout=gl.SliceLayout(0, g))
        c_r = gl.arange(0, DR, layout=gl.SliceLayout(0, g))
        hq = h0 + gl.arange(0, 64, layout=rows_l)
        ql = ql_ptr + b * s_qlb + hq[:, None] * s_qlh + c_half[None, :]
        cp.async_copy_global_to_shared(q_l.index(0), ql)
        cp.async_copy_global_to_shared(q_l.index(1), ql + HALF)
        cp.async_copy_global_to_shared(q_r.index(0), qr_ptr + b * s_qrb + hq[:, None] * s_qrh + c_r[None, :])
        cp.mbarrier_arrive(bars.index(_Q_READY), increment_count=False)

        rows = gl.arange(0, BLOCK_N, layout=rows_l)
        idx_row = idx_ptr + b * s_ib
        n_a = t0 * BLOCK_N + rows
        pos_a = gl.load(idx_row + n_a, mask=n_a < end, other=-1)
        n_b = n_a + BLOCK_N
        pos_b = gl.load(idx_row + n_b, mask=n_b < end, other=-1)
        for j in range(n_pairs):
            ph = (j & 1) ^ 1  # a fresh barrier counts as completed in phase 1: the first waits pass
            blk_a, ok_a = _blocks(pos_a, bt_ptr, b, s_bt, BS)
            blk_b, ok_b = _blocks(pos_b, bt_ptr, b, s_bt, BS)
            off_a = _offsets(blk_a, pos_a, ok_a, layer, s_l0, s_l1, s_l2, BS)
            off_b = _offsets(blk_b, pos_b, ok_b, layer, s_l0, s_l1, s_l2, BS)
            n_a = n_a + 2 * BLOCK_N  # the next pair's positions load while this pair's copies wait
            pos_a = gl.load(idx_row + n_a, mask=n_a < end, other=-1)
            n_b = n_b + 2 * BLOCK_N
            pos_b = gl.load(idx_row + n_b, mask=n_b < end, other=-1)
            src_a = lat_ptr + off_a[:, None]
            src_b = lat_ptr + off_b[:, None]

            mbarrier.wait(bars.index(_FREE_OWN + 0), ph)
            cp.async_copy_global_to_shared(k_lo.index(0), src_a + c_half[None, :], mask=ok_a[:, None])
            cp.mbarrier_arrive(bars.index(_READY_OWN + 0), increment_count=False)
            mbarrier.wait(bars.index(_FREE_OWN + 1), ph)
            cp.async_copy_global_to_shared(k_hi.index(1), src_b + HALF + c_half[None, :], mask=ok_b[:, None])
            cp.mbarrier_arrive(bars.index(_READY_OWN + 1), increment_count=False)
            mbarrier.wait(bars.index(_FREE_OTH + 0), ph)
            cp.async_copy_global_to_shared(k_hi.index(0), src_a + HALF + c_half[None, :], mask=ok_a[:, None])
            cp.async_copy_global_to_shared(k_r.index(0), src_a + DL + c_r[None, :], mask=ok_a[:, None])
            cp.mbarrier_arrive(bars.index(_READY_OTH + 0), increment_count=False)
            mbarrier.wait(bars.index(_FREE_OTH + 1), ph)
            cp.async_copy_global_to_shared(k_lo.index(1), src_b + c_half[None, :], mask=ok_b[:, None])
            cp.async_copy_global_to_shared(k_r.index(1), src_b + DL + c_r[None, :], mask=ok_b[:, None])
            cp.mbarrier_arrive(bars.index(_READY_OTH + 1), increment_count=False)

    @gluon.jit
    def _ws_consumer(
        idx_ptr, o_ptr, lse_ptr, b, h0, sp, t0, end, n_pairs, qk_scale,
        s_ib, s_ob, s_oh, s_os, s_lb, s_lh,
        q_l, q_r, k_lo, k_hi, k_r, stats, bars,
        WG: gl.constexpr, DL: gl.constexpr, BLOCK_N: gl.constexpr, MULTI: gl.constexpr, OVERLAP: gl.constexpr,
    ):  # fmt: skip
        """Computing warp group WG: its tiles' Q.K^T and softmax, and its half of every tile's P.V."""
        HALF: gl.constexpr = DL // 2
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        m = gl.full([64], -1.0e30, gl.float32, layout=row_s)
        l = gl.zeros([64], gl.float32, layout=row_s)
        acc = gl.zeros([64, HALF], gl.float32, layout=o_layout)
        if OVERLAP:  # the loop leaves each pair's remote product in flight: O crosses iterations as its token
            acc = warpgroup_mma_init(acc)
        s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
        idx_row = idx_ptr + b * s_ib
        mbarrier.wait(bars.index(_Q_READY), 0)
        for j in range(n_pairs):
            ph = j & 1
            # z = 0 (n_pairs < 2^30) but unknown to the compiler: with constant buffers it hoists every
            # wgmma operand descriptor of the loop out of it (~70 64-bit values) and spills them
            z = j >> 30
            # this group's buffer: its own half (= its output columns) and the other half; Q likewise
            if WG == 0:
                q_own = q_l.index(z)
                q_oth = q_l.index(1 + z)
                kv_own = k_lo.index(z)
                kv_oth = k_hi.index(z)
                v_remote = k_lo.index(1 + z)  # the other buffer's half with this group's output columns
            else:
                q_own = q_l.index(1 + z)
                q_oth = q_l.index(z)
                kv_own = k_hi.index(1 + z)
                kv_oth = k_lo.index(1 + z)
                v_remote = k_hi.index(z)
            kr_own = k_r.index(WG + z)
            n = (t0 + 2 * j + WG) * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_s)
            pos = gl.load(idx_row + n, mask=n < end, other=-1)  # past the split's end: -1, not copied
            mbarrier.wait(bars.index(_READY_OWN + WG), ph)
            fence_async_shared()  # the cp.async writes, visible to the tensor cores
            s = warpgroup_mma(q_own, kv_own.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if OVERLAP:  # the last pair's remote product, left in flight, is done: its buffer part frees up
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(bars.index(_FREE_OTH + OTHER), pred=j > 0)
            mbarrier.wait(bars.index(_READY_OTH + WG), ph)
            fence_async_shared()
            s = warpgroup_mma(q_oth, kv_oth.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma(q_r.index(z), kr_own.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            s = gl.where((pos >= 0)[None, :], s * qk_scale, float("-inf"))
            # the pair's running max: group 0 first, group 1 folds its tile in
            if WG == 0:
                m_new = gl.maximum(m, gl.max(s, axis=1))
            else:
                mbarrier.wait(bars.index(_M_READY + 0), ph)
                m_new = gl.maximum(stats.index(0).load(row_s), gl.max(s, axis=1))
            stats.index(WG).store(m_new)
            gl.thread_barrier()
            mbarrier.arrive(bars.index(_M_READY + WG))
            alpha = gl.exp2(m - m_new)
            p = gl.exp2(s - m_new[:, None])
            l = l * alpha + gl.sum(p, axis=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), kv_own, acc, is_async=True)
            if WG == 0:  # rescale to the pair's max
                mbarrier.wait(bars.index(_M_READY + 1), ph)
                m_pair = stats.index(1).load(row_s)
                c = gl.exp2(m_new - m_pair)
                p = p * c[:, None]
                l = l * c
                m_new = m_pair
            kr_own.store(p.to(gl.bfloat16))  # P over the rope part this group's Q.K^T is done with
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(bars.index(_P_READY + WG))
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            gl.thread_barrier()
            mbarrier.arrive(bars.index(_FREE_OWN + WG))
            if WG == 0:
                acc = acc * gl.convert_layout(c, row_o)[:, None]
            mbarrier.wait(bars.index(_P_READY + OTHER), ph)
            acc = warpgroup_mma(k_r.index(OTHER + z), v_remote, acc, is_async=True)
            if not OVERLAP:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(bars.index(_FREE_OTH + OTHER))
            m = m_new
        if OVERLAP:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        # the softmax denominator is the sum of both groups' (each summed its own tiles' P)
        stats.index(2 + WG).store(l)
        gl.thread_barrier()
        mbarrier.arrive(bars.index(_L_READY + WG))
        mbarrier.wait(bars.index(_L_READY + OTHER), 0)
        l = l + stats.index(2 + OTHER).load(row_s)
        l_o = gl.convert_layout(l, row_o)
        out = acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]
        ho = h0 + gl.arange(0, 64, layout=row_o)
        co = WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + b * s_ob + ho[:, None] * s_oh + sp * s_os + co[None, :], out.to(o_ptr.dtype.element_ty))
        if MULTI and WG == 0:
            hs = h0 + gl.arange(0, 64, layout=row_s)
            gl.store(lse_ptr + b * s_lb + hs * s_lh + sp, _lse(m, l))

    @gluon.jit
    def _sparse_mla_ws_kernel(
        ql_ptr, qr_ptr, lat_ptr, bt_ptr, idx_ptr, o_ptr, lse_ptr,
        layer, topk, qk_scale, split_len,
        s_qlb, s_qlh, s_qrb, s_qrh, s_l0, s_l1, s_l2, s_bt, s_ib, s_ob, s_oh, s_os, s_lb, s_lh,
        DL: gl.constexpr, DR: gl.constexpr, BS: gl.constexpr, GROUPS: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, MULTI: gl.constexpr, SCAN: gl.constexpr, OVERLAP: gl.constexpr,
    ):  # fmt: skip
        gl.static_assert(gl.num_warps() == 4, "the first computing warp group runs the kernel's own warps")
        gl.static_assert(BLOCK_H == 64, "64 heads a program (wgmma M)")
        gl.static_assert(BLOCK_N == 64, "64 positions a tile")
        gl.static_assert(DR == BLOCK_N, "P [64 heads, BLOCK_N] is written over a tile's rope part [BLOCK_N, DR]")
        HALF: gl.constexpr = DL // 2
        smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        pos_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])

        b, h0, sp, start, end, t0 = _program_split(topk, split_len, GROUPS, BLOCK_H, BLOCK_N)

        q_l = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, HALF], smem_l)  # latent columns 0-255, 256-511
        q_r = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, DR], smem_l)
        k_lo = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, HALF], smem_l)
        k_hi = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, HALF], smem_l)
        k_r = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, DR], smem_l)
        stats = gl.allocate_shared_memory(gl.float32, [4, BLOCK_H], flat)  # rows m0, m1, l0, l1 (flat: rank 1 fits
        # a buffer used row by row through .index)
        bars = gl.allocate_shared_memory(gl.int64, [_N_BARRIERS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(_N_BARRIERS):
            if i < _FREE_OWN or i == _Q_READY:  # arrived on by every producer thread's cp.async
                mbarrier.init(bars.index(i), count=128)
            else:
                mbarrier.init(bars.index(i), count=1)

        last = _last_selected(idx_ptr, b, s_ib, start, end, SCAN, pos_l)
        n_pairs = gl.cdiv(gl.cdiv(last + 1 - start, BLOCK_N), 2)

        # the producer runs in the kernel's own warps (the default partition: it gets the registers the
        # computing groups leave, 168 x 12 warps - 2 x 4 x 216 = 4 x 72)
        gl.warp_specialize(
            [
                (_ws_producer, (lat_ptr, idx_ptr, bt_ptr, ql_ptr, qr_ptr, b, h0, layer, t0, end, n_pairs,
                                s_qlb, s_qlh, s_qrb, s_qrh, s_l0, s_l1, s_l2, s_bt, s_ib,
                                q_l, q_r, k_lo, k_hi, k_r, bars, DL, DR, BS, BLOCK_N)),
                (_ws_consumer, (idx_ptr, o_ptr, lse_ptr, b, h0, sp, t0, end, n_pairs, qk_scale,
                                s_ib, s_ob, s_oh, s_os, s_lb, s_lh, q_l, q_r, k_lo, k_hi, k_r, stats, bars,
                                0, DL, BLOCK_N, MULTI, OVERLAP)),
                (_ws_consumer, (idx_ptr, o_ptr, lse_ptr, b, h0, sp, t0, end, n_pairs, qk_scale,
                                s_ib, s_ob, s_oh, s_os, s_lb, s_lh, q_l, q_r, k_lo, k_hi, k_r, stats, bars,
                                1, DL, BLOCK_N, MULTI, OVERLAP)),
            ],
            [4, 4],
            [_WS_REGS, _WS_REGS],
        )  # fmt: skip
