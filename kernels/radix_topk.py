"""Row-wise top-k indices of fp32 scores by radix select: the lightning indexer's selection step.

    logits [B, W] fp32, -inf = not visible  ->  indices [B, k] int32, -1 padding

Row b selects min(k, visible_b) positions; when at most k positions are visible every one of them is
selected, ascending. Otherwise the order within a row is: the positions whose score is above the k-th
largest, ascending, then the ties at the k-th largest value, lowest positions first (so among equal
scores the lowest positions win; torch.topk may pick others). With distinct scores the selected SET
equals torch.topk's. Every Triton variant below writes exactly this output, bit for bit.

Radix select: each fp32 score maps to a uint32 key in the same order (negative floats: all bits flipped;
others: the sign bit set; a position that is not visible gets key 0 and is masked out). Digit passes
(four of 8 bits unless said otherwise) histogram one digit of the keys (high digit first) among the keys
that match the digits found so far, each time picking the digit value that holds the k-th largest key
(the histogram is taken over the reversed digit, so one cumulative sum gives "how many keys have a digit
>= d" and one packed reduction gives both the digit and the count above it). The key so found is the threshold T; a write pass stores
the positions with key > T (by a cumulative count of them) and then the first ties key == T.
-0.0 ranks just below +0.0 (torch.topk treats them as equal), and a NaN score counts as not visible
(torch.topk ranks NaN above everything); the indexer's scores are never NaN.

Three kernels, none with a host synchronisation or a data-dependent grid (all CUDA-graph capturable):

- stream (`topk_triton`): one program per row streams the row in BLOCK pieces, five reads of it
  (four digit passes and the write pass). Fills the GPU only with many rows.
- reg (`topk_triton_reg`, widths up to REG_MAX_WIDTH): one program per row loads the whole row once
  (BLOCK = next power of two >= W, 8 to 16 warps) and keeps its keys in registers for the digit passes
  and the write pass: one read, one launch. Its digits are narrower (REG_BITS = 5: seven passes of 32
  bins), since with the row in registers a pass costs tl.histogram's work, which grows with the bins per
  lane, not a read. For short rows at any batch.
- split (`topk_triton_split`): a [rows, chunks] grid, each program owning one BLOCK-wide chunk of a
  row, five launches (four digit passes, one write pass) after a memset. Digit pass p adds its chunk's
  histogram into a per-row total with atomics (tot [4, B, 256]) and, from p = 1 on, first reads pass
  p-1's total to pick byte p-1 and records (threshold prefix, k still wanted, visible count) per row
  (state [4, B, 4]; only chunk 0 writes, and pass p reads what pass p-1 wrote, so no race). Pass 0
  also stores each chunk's visible count, pass 3 each chunk's cumulative low-byte histogram and its
  count of keys above the 24-bit prefix: from these the write pass knows how many keys above T and
  equal to T lie in the chunks before its own, so every chunk writes its positions straight into their
  final slots (the same order as above; no atomics decide a slot). For a few long rows.

`topk` picks one by (rows, width): `choose_kernel` below, with constants from bench/topk.py (torch.topk and each
variant, CUDA-graph replays; it prints each cell's fastest variant and the smallest row count from which the
pick beats torch.topk): torch.topk below MIN_ROWS rows (1: never), then the reg kernel for rows up to
REG_MAX_WIDTH wide (0: off, see there), else the split kernel up to SPLIT_MAX_ROWS (32) rows and the stream kernel
beyond.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, next_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton


def topk_ref(logits: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk of each row; -1 where the selected score is -inf (fewer than k visible)."""
    if logits.shape[1] <= k:  # every visible position is selected: no sort needed
        logits = F.pad(logits, (0, k - logits.shape[1]), value=float("-inf"))
        idx = torch.arange(k, device=logits.device).expand_as(logits)
        return torch.where(logits == float("-inf"), -1, idx).to(torch.int32)
    vals, idx = logits.topk(k, dim=-1, sorted=False)
    return torch.where(vals == float("-inf"), torch.full_like(idx, -1), idx).to(torch.int32)


if HAS_TRITON:

    @triton.jit
    def _sort_key(x):
        """fp32 -> uint32 with the same order (-inf lowest, +inf highest; -0 just below +0)."""
        u = x.to(tl.uint32, bitcast=True)
        flip = tl.where((u >> 31) != 0, 0xFFFFFFFF, 0x80000000)
        return u ^ flip.to(tl.uint32)

    @triton.jit
    def _keys(x):
        """(visible, key): key 0 where not visible (-inf, NaN or past the row's end)."""
        vis = x > float("-inf")
        return vis, tl.where(vis, _sort_key(x), 0).to(tl.uint32)

    @triton.jit
    def _rdigit(key, shift, NB: tl.constexpr = 256):
        """NB - 1 - (the digit of key at shift): the histogram bin, so that a cumulative sum counts keys >= a digit."""
        return (((key ^ 0xFFFFFFFF) >> shift) & (NB - 1)).to(tl.int32)

    @triton.jit
    def _pick(rhist, k_rem, NB: tl.constexpr = 256):
        """From the histogram over NB - 1 - digit of the live keys, the digit d holding the k_rem-th largest
        key and how many of that digit's keys are still wanted: (d, k_rem - keys with a digit above d).

        One packed reduction (NB <= 256, counts < 2^22) gives both the number of bins below the one
        reaching k_rem and the count in them. An empty histogram (no visible key) gives d = 0.
        """
        ge = tl.cumsum(rhist, 0)  # ge[j]: live keys whose digit >= NB - 1 - j (non-decreasing)
        s = tl.sum(tl.where(ge < k_rem, 1 + (rhist << 9), 0))
        d = tl.maximum(NB - 1 - (s & 511), 0)
        return d, k_rem - (s >> 9)

    @triton.jit
    def _topk_kernel(
        x_ptr,
        out_ptr,
        width,
        s_x,
        s_o,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        OBLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + row * s_x
        orow = out_ptr + row * s_o
        offs = tl.arange(0, BLOCK)
        prefix = tl.zeros([], dtype=tl.uint32)  # the threshold key's bytes found so far
        known = tl.zeros([], dtype=tl.uint32)  # which bits of prefix are found
        k_rem = tl.zeros([], dtype=tl.int32) + K  # how many of the keys matching prefix are still wanted
        n_vis = tl.zeros([], dtype=tl.int32)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, width, BLOCK):
                pos = start + offs
                vis, key = _keys(tl.load(xrow + pos, mask=pos < width, other=float("-inf")))
                live = vis & ((key & known) == prefix)
                hist += tl.histogram(_rdigit(key, shift), 256, mask=live)
            if p == 0:
                n_vis = tl.sum(hist)
                k_rem = tl.minimum(k_rem, tl.maximum(n_vis, 1))
            d, k_rem = _pick(hist, k_rem)
            prefix = prefix | (d.to(tl.uint32) << shift)
            known = known | (tl.full([], 0xFF, tl.uint32) << shift)
        take_all = n_vis <= K
        n_sel = tl.minimum(n_vis, K)
        n_above = n_sel - k_rem  # positions strictly above the threshold; then k_rem ties
        done_above = tl.zeros([], dtype=tl.int32)
        done_ties = tl.zeros([], dtype=tl.int32)
        for start in range(0, width, BLOCK):
            pos = start + offs
            vis, key = _keys(tl.load(xrow + pos, mask=pos < width, other=float("-inf")))
            above = tl.where(take_all, vis, vis & (key > prefix))  # (a scalar & a tensor: the interpreter errs)
            tie = tl.where(take_all, False, vis & (key == prefix))
            cnt = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), 0)  # BLOCK < 2^15
            rank_t = done_ties + (cnt >> 16) - 1
            tl.store(orow + done_above + (cnt & 0xFFFF) - 1, pos, mask=above)
            tl.store(orow + n_above + rank_t, pos, mask=tie & (rank_t < k_rem))
            last = tl.sum(tl.where(offs == BLOCK - 1, cnt, 0))
            done_above += last & 0xFFFF
            done_ties += last >> 16
        for start in range(0, K, OBLOCK):
            o = start + tl.arange(0, OBLOCK)
            tl.store(orow + o, tl.full([OBLOCK], -1, tl.int32), mask=(o >= n_sel) & (o < K))

    @triton.jit
    def _topk_reg_kernel(
        x_ptr,
        out_ptr,
        width,
        s_x,
        s_o,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        OBLOCK: tl.constexpr,
        BITS: tl.constexpr,  # digit width: ceil(32 / BITS) passes of 2^BITS bins (the top digit may be narrower)
        PDL: tl.constexpr = False,
    ):
        """The whole row (width <= BLOCK) in registers: one read, ceil(32 / BITS) digit passes, one write."""
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        orow = out_ptr + row * s_o
        pos = tl.arange(0, BLOCK)
        _, key = _keys(tl.load(x_ptr + row * s_x + pos, mask=pos < width, other=float("-inf")))
        # visible <=> key != 0 (_keys gives 0 to -inf, NaN and past-the-row positions; no finite score maps
        # to 0): no mask held in registers beside the keys
        prefix = tl.zeros([], dtype=tl.uint32)
        known = tl.zeros([], dtype=tl.uint32)
        k_rem = tl.zeros([], dtype=tl.int32) + K
        n_vis = tl.zeros([], dtype=tl.int32)
        for p in tl.static_range((31 + BITS) // BITS):
            shift = BITS * ((31 + BITS) // BITS - 1 - p)  # digits aligned at bit 0; bits past 31 shift out
            live = (key != 0) & ((key & known) == prefix)
            hist = tl.histogram(_rdigit(key, shift, 1 << BITS), 1 << BITS, mask=live)
            if p == 0:
                n_vis = tl.sum(hist)
                k_rem = tl.minimum(k_rem, tl.maximum(n_vis, 1))
            d, k_rem = _pick(hist, k_rem, 1 << BITS)
            prefix = prefix | (d.to(tl.uint32) << shift)
            known = known | (tl.full([], (1 << BITS) - 1, tl.uint32) << shift)
        take_all = n_vis <= K
        n_sel = tl.minimum(n_vis, K)
        n_above = n_sel - k_rem
        above = tl.where(take_all, key != 0, key > prefix)  # prefix > 0 when some key is visible
        tie = tl.where(take_all, False, (key == prefix) & (key != 0))
        cnt = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), 0)  # BLOCK < 2^15
        rank_t = (cnt >> 16) - 1
        tl.store(orow + (cnt & 0xFFFF) - 1, pos, mask=above)
        tl.store(orow + n_above + rank_t, pos, mask=tie & (rank_t < k_rem))
        for start in range(0, K, OBLOCK):
            o = start + tl.arange(0, OBLOCK)
            tl.store(orow + o, tl.full([OBLOCK], -1, tl.int32), mask=(o >= n_sel) & (o < K))

    @triton.jit
    def _split_hist_kernel(
        x_ptr,
        tot_ptr,  # [4, B, 256] int32, zeroed: per-row histograms (over 255 - byte), one per pass
        state_ptr,  # [4, B, 4] int32: (prefix bits, k still wanted, visible count, 0) before pass p
        vis_ptr,  # [B, C] int32: visible keys per chunk (pass 0)
        ge_ptr,  # [B, C, 256] int32: per chunk, cumulative pass-3 histogram (pass 3)
        above_ptr,  # [B, C] int32: per chunk, keys above the 24-bit prefix (pass 3)
        width,
        s_x,
        n_rows,
        n_chunks,
        K: tl.constexpr,
        P: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        bins = tl.arange(0, 256)
        pos = chunk * BLOCK + tl.arange(0, BLOCK)
        vis, key = _keys(tl.load(x_ptr + row.to(tl.int64) * s_x + pos, mask=pos < width, other=float("-inf")))
        prefix = tl.zeros([], dtype=tl.uint32)
        if P > 0:  # pick byte P-1 from pass P-1's total, carry the state on
            prev = tl.load(tot_ptr + ((P - 1) * n_rows + row) * 256 + bins)
            if P == 1:
                n_vis = tl.sum(prev)
                k_rem = tl.minimum(tl.maximum(n_vis, 1), K)
            else:
                st = state_ptr + ((P - 1) * n_rows + row) * 4
                prefix = tl.load(st).to(tl.uint32, bitcast=True)
                k_rem = tl.load(st + 1)
                n_vis = tl.load(st + 2)
            d, k_rem = _pick(prev, k_rem)
            prefix = prefix | (d.to(tl.uint32) << (32 - 8 * P))
            st = state_ptr + (P * n_rows + row) * 4
            first = chunk == 0
            tl.store(st, prefix.to(tl.int32, bitcast=True), mask=first)
            tl.store(st + 1, k_rem, mask=first)
            tl.store(st + 2, n_vis, mask=first)
            live = vis & ((key >> (32 - 8 * P)) == (prefix >> (32 - 8 * P)))
        else:
            live = vis
        hist = tl.histogram(_rdigit(key, 24 - 8 * P), 256, mask=live)
        tl.atomic_add(tot_ptr + (P * n_rows + row) * 256 + bins, hist, mask=hist != 0, sem="relaxed")
        if P == 0:
            tl.store(vis_ptr + row * n_chunks + chunk, tl.sum(vis.to(tl.int32)))
        if P == 3:
            tl.store(ge_ptr + (row * n_chunks + chunk) * 256 + bins, tl.cumsum(hist, 0))
            n_up = tl.sum((vis & ((key >> 8) > (prefix >> 8))).to(tl.int32))
            tl.store(above_ptr + row * n_chunks + chunk, n_up)

    @triton.jit
    def _split_write_kernel(
        x_ptr,
        out_ptr,
        tot_ptr,
        state_ptr,
        vis_ptr,
        ge_ptr,
        above_ptr,
        width,
        s_x,
        s_o,
        n_rows,
        n_chunks,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        CP2: tl.constexpr,  # next power of two >= n_chunks
        OBLOCK: tl.constexpr,  # this chunk's share of the -1 padding; n_chunks * OBLOCK >= K
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        bins = tl.arange(0, 256)
        st = state_ptr + (3 * n_rows + row) * 4
        prefix = tl.load(st).to(tl.uint32, bitcast=True)
        k_rem = tl.load(st + 1)
        n_vis = tl.load(st + 2)
        d, k_rem = _pick(tl.load(tot_ptr + (3 * n_rows + row) * 256 + bins), k_rem)
        thr = prefix | d.to(tl.uint32)
        take_all = n_vis <= K
        n_sel = tl.minimum(n_vis, K)
        n_above = n_sel - k_rem
        # keys above thr and equal to it in the chunks before this one
        cs = tl.arange(0, CP2)
        before = cs < chunk
        crow = row * n_chunks + cs
        j = 255 - d  # ge[c, j]: chunk c's keys matching the 24-bit prefix with a low byte >= d
        ge_d = tl.load(ge_ptr + crow * 256 + j, mask=before, other=0)
        ge_up = tl.load(ge_ptr + crow * 256 + j - 1, mask=tl.where(j > 0, before, False), other=0)
        n_vis_before = tl.sum(tl.load(vis_ptr + crow, mask=before, other=0))
        n_up_before = tl.sum(tl.load(above_ptr + crow, mask=before, other=0) + ge_up)
        base_above = tl.where(take_all, n_vis_before, n_up_before)
        base_ties = tl.where(take_all, 0, tl.sum(ge_d - ge_up))
        pos = chunk * BLOCK + tl.arange(0, BLOCK)
        vis, key = _keys(tl.load(x_ptr + row.to(tl.int64) * s_x + pos, mask=pos < width, other=float("-inf")))
        above = tl.where(take_all, vis, vis & (key > thr))  # (a scalar & a tensor: the interpreter errs)
        tie = tl.where(take_all, False, vis & (key == thr))
        cnt = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), 0)  # BLOCK < 2^15
        rank_t = base_ties + (cnt >> 16) - 1
        orow = out_ptr + row.to(tl.int64) * s_o
        tl.store(orow + base_above + (cnt & 0xFFFF) - 1, pos, mask=above)
        tl.store(orow + n_above + rank_t, pos, mask=tie & (rank_t < k_rem))
        o = chunk * OBLOCK + tl.arange(0, OBLOCK)
        tl.store(orow + o, tl.full([OBLOCK], -1, tl.int32), mask=(o >= n_sel) & (o < K))


def _check(logits: torch.Tensor, k: int) -> torch.Tensor:
    require_triton()
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [B, W] fp32, got {tuple(logits.shape)} {logits.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if logits.shape[1] >= 1 << 22:  # _pick packs counts into 22 bits
        raise ValueError(f"rows of at most 2^22 - 1 scores, got {logits.shape[1]}")
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _check_block(block: int) -> None:
    """A power of two below 2^15: the write pass packs two counts of up to `block` into one int32."""
    if block < 1 or block & (block - 1) or block >= 1 << 15:
        raise ValueError(f"block must be a power of two below 2^15, got {block}")


def _warps(block: int) -> int:
    return max(4, min(16, block // 512))


def reg_warps(width: int) -> int:
    """The reg kernel's default warps for a row of `width` scores (8 at 4096, 16 from 8192 on)."""
    return _warps(max(16, next_pow2(width)))


def topk_triton(logits: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """The stream kernel: one program per row, five reads of it in `block` pieces (a power of two < 2^15)."""
    logits = _check(logits, k)
    _check_block(block)
    out = torch.empty(logits.shape[0], k, device=logits.device, dtype=torch.int32)
    return _stream_into(logits, out, k, block)


def _stream_into(logits: torch.Tensor, out: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """The stream kernel writing into `out` ([B, k] int32, unit column stride, any row stride): every slot of
    it and nothing else. For bench/topk_diag.py (out a view into a guarded buffer)."""
    bsz, width = logits.shape
    if bsz:
        _topk_kernel[(bsz,)](
            logits,
            out,
            width,
            logits.stride(0),
            out.stride(0),
            K=k,
            BLOCK=block,
            OBLOCK=min(1024, next_pow2(k)),
            num_warps=8,
            **pdl(_topk_kernel, logits),
        )
    return out


def topk_triton_reg(
    logits: torch.Tensor, k: int, num_warps: int | None = None, bits: int | None = None
) -> torch.Tensor:
    """The reg kernel: one program per row holding the whole row (width <= REG_MAX_WIDTH) in registers.

    bits: digit width, 5..8: ceil(32 / bits) passes over 2^bits bins. Narrower digits mean more passes but a
    cheaper tl.histogram (its cost per element grows with the bins per lane, 2^bits / 32), which is the
    kernel's main work once the row is loaded. Default REG_BITS (5): 6 is miscompiled by triton 3.6 at 4 warps
    (REG_MAX_WIDTH's comment).
    Not below 5: Triton lowers a histogram of fewer bins than a warp's 32 lanes by padding it to 32.
    """
    logits = _check(logits, k)
    bits = REG_BITS if bits is None else bits
    if not 5 <= bits <= 8:
        raise ValueError(f"bits must be in 5..8, got {bits}")
    bsz, width = logits.shape
    if width > REG_WIDTH_LIMIT:
        raise ValueError(f"topk_triton_reg takes rows of at most {REG_WIDTH_LIMIT} scores, got {width}")
    out = torch.empty(bsz, k, device=logits.device, dtype=torch.int32)
    return _reg_into(logits, out, k, num_warps, bits)


def _reg_into(
    logits: torch.Tensor, out: torch.Tensor, k: int, num_warps: int | None = None, bits: int | None = None
) -> torch.Tensor:
    """The reg kernel writing into `out` ([B, k] int32, unit column stride, any row stride), as _stream_into."""
    bsz, width = logits.shape
    if bsz:
        _topk_reg_kernel[(bsz,)](
            logits,
            out,
            width,
            logits.stride(0),
            out.stride(0),
            K=k,
            BLOCK=max(16, next_pow2(width)),
            OBLOCK=min(2048, next_pow2(k)),
            BITS=REG_BITS if bits is None else bits,
            num_warps=num_warps or reg_warps(width),
            **pdl(_topk_reg_kernel, logits),
        )
    return out


def split_block(rows: int, width: int, programs: int = 264) -> int:
    """The chunk width of the split kernel: about `programs` programs in all (two per SM of an H100/H200),
    chunks of 1024..8192 scores."""
    return min(8192, max(1024, next_pow2(-(-rows * width // programs))))


def topk_triton_split(logits: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """The split kernel: each row cut into `block`-wide chunks (default split_block), one program per chunk,
    a memset and five launches."""
    logits = _check(logits, k)
    bsz, width = logits.shape
    out = torch.empty(bsz, k, device=logits.device, dtype=torch.int32)
    if bsz == 0:
        return out
    block = block or split_block(bsz, width)
    _check_block(block)
    chunks = max(1, -(-width // block))
    dev = logits.device
    tot = torch.zeros(4, bsz, 256, device=dev, dtype=torch.int32)
    scratch = torch.empty(bsz * (16 + chunks * 258), device=dev, dtype=torch.int32)
    state = scratch[: bsz * 16]
    vis = scratch[bsz * 16 : bsz * (16 + chunks)]
    above = scratch[bsz * (16 + chunks) : bsz * (16 + 2 * chunks)]
    ge = scratch[bsz * (16 + 2 * chunks) :]
    grid = (bsz, chunks)
    warps = _warps(block)
    for p in range(4):
        _split_hist_kernel[grid](
            logits,
            tot,
            state,
            vis,
            ge,
            above,
            width,
            logits.stride(0),
            bsz,
            chunks,
            K=k,
            P=p,
            BLOCK=block,
            num_warps=warps,
            **pdl(_split_hist_kernel, logits),
        )
    _split_write_kernel[grid](
        logits,
        out,
        tot,
        state,
        vis,
        ge,
        above,
        width,
        logits.stride(0),
        out.stride(0),
        bsz,
        chunks,
        K=k,
        BLOCK=block,
        CP2=max(2, next_pow2(chunks)),
        OBLOCK=max(16, next_pow2(-(-k // chunks))),
        num_warps=warps,
        **pdl(_split_write_kernel, logits),
    )
    return out


#: rows from which a Triton kernel serves `topk` on CUDA (below: torch.topk). bench/topk.py on an H100
#: (bench/results/decode-h100-r3/run1-topk.log, k 2048, us per call warm): at 1 / 8 / 64 / 256 rows x 4096
#: torch.topk takes 24 / 32 / 34 / 74, choose_kernel's pick with the reg kernel on 15 / 16 / 11 / 18; x 8192:
#: 44 / 52 / 61 / 84 against 15 / 16 / 32 / 54 (split, split, stream, stream): the Triton kernels win from one
#: row on. The engine's decode step at batch 1: 2.74 -> 2.69 ms (bench/results/decode-h100-r4). It was 64 while a
#: graph-capture failure with the reg kernel was open: with MIN_ROWS = 1 and REG_MAX_WIDTH = 4096,
#: tests/engine/test_engine_cuda.py::test_warm_up_captures_every_size_and_nothing_while_serving failed on an
#: H100 (the fp32 engine's decode graph of 8 rows: the capture invalidated, cuBLAS's next call inside it failing
#: with EXECUTION_FAILED; bench/results/decode-h100-r3/t-engine-cuda.log, and the same in
#: bench/results/issue19-h100/engine-tests-with-reg-topk.log). With the reg kernel off (REG_MAX_WIDTH = 0: the
#: split and stream kernels from one row on) the engine's CUDA tests pass (decode-h100-r4/t-engine-cuda-triton-topk.log).
MIN_ROWS = 1
#: widest row `topk` gives the reg kernel: it holds next_pow2(width) keys in registers, so its time is set by
#: that power of two (4096: 11 us at 1-64 rows, 18 at 256; 8192: 18.5 / 37), where the stream kernel's grows
#: with the width itself (4096: 17.5 / 28; 8192: 32 / 54): the reg kernel wins at and just below a power of
#: two, the stream kernel just above one (a decode row at context 4096 is 4160 wide). 4096 is the value to
#: set once the capture failure under MIN_ROWS is understood (it was seen only with this kernel); 0 (off) until then.
#: History: with 6-bit digits it passed tests/kernels/test_topk.py on an H100 but inside the engine it left
#: the tie slot of 7 rows unwritten on a call of 142 rows x 304 scores, k 128 (garbage indices that sparse MLA
#: then read: an illegal memory access; bench/topk_diag.py --engine, bench/results/topk-diag-h100). Only with
#: 6-bit digits at 4 warps (the default for rows up to 2048) and a width divisible by 16: 5, 7 or 8 bits, 8 or
#: 16 warps, width 300, or the kernel compiled without integer specialisation all gave the exact output, and
#: so does the interpreter: a triton 3.6 sm_90 code-generation fault around the 64-bin histogram held over 128
#: threads. Hence REG_BITS = 5 (also the fastest: 10.5 against 11.1 us for 7 bits at 1 x 4096), and
#: tests/kernels/test_topk.py replays that call (passes on an H100 at 4, 8 and 16 warps).
REG_MAX_WIDTH = 0
#: the reg kernel's digit width (topk_triton_reg's bits)
REG_BITS = 5
REG_WIDTH_LIMIT = 16384
#: rows wider than REG_MAX_WIDTH: the split kernel up to this many rows, the stream kernel beyond
SPLIT_MAX_ROWS = 32

#: the Triton variants by choose_kernel's names, each called as fn(logits, k)
VARIANTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "stream": topk_triton,
    "reg": topk_triton_reg,
    "split": topk_triton_split,
}


def choose_kernel(rows: int, width: int, min_rows: int | None = None, reg_max_width: int | None = None) -> str:
    """Which implementation `topk` runs on CUDA for a [rows, width] input: "torch", "reg", "split" or "stream"
    (min_rows, reg_max_width: other values for MIN_ROWS, REG_MAX_WIDTH)."""
    if rows < (MIN_ROWS if min_rows is None else min_rows):
        return "torch"
    if width <= (REG_MAX_WIDTH if reg_max_width is None else reg_max_width):
        return "reg"
    return "split" if rows <= SPLIT_MAX_ROWS else "stream"


def topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k largest scores.

    Args:
        logits: [B, W] fp32 scores, -inf at positions a row cannot see.
        k: how many to select per row.
    Returns:
        [B, k] int32 positions in no promised order (module docstring: the kernels' order and ties);
        -1 fills the row when fewer than k positions are visible. No host synchronisation.
    """
    name = choose_kernel(*logits.shape) if use_triton(logits) else "torch"
    return topk_ref(logits, k) if name == "torch" else VARIANTS[name](logits, k)
