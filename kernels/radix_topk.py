"""Row-wise top-k indices of fp32 scores by radix select: the lightning indexer's selection step.

    logits [B, W] fp32, -inf = not visible  ->  indices [B, k] int32, -1 padding

Row b selects min(k, visible_b) positions; when at most k positions are visible every one of them is
selected. Order within a row: the positions whose score is above the k-th largest, ascending, then
the ties at the k-th largest value, lowest positions first (so among equal scores the lowest
positions win; torch.topk may pick others). With distinct scores the selected SET equals torch.topk's.

The Triton kernel runs one program per row, with no host synchronisation (CUDA-graph capturable):
each fp32 score maps to a uint32 key in the same order (negative floats: all bits flipped; others:
the sign bit set); four passes over the row histogram one byte of the keys (high byte first) among
the keys that match the bytes found so far, each time picking the byte value that holds the k-th
largest key; the fifth pass writes the positions above that threshold key and then enough positions
equal to it. Five reads of the row in all (its first histogram also counts the visible positions).
-0.0 ranks just below +0.0 in the kernel (torch.topk treats them as equal), and a NaN score counts as
not visible (torch.topk ranks NaN above everything); the indexer's scores are never NaN.

One program per row: a batch of one row runs on one SM. On an H200 (bench/results/glue-h200) the kernel
took 124 us per decode step (4 layers) at batch 1 where torch.topk took 96 us, and about the same at
batch 64 (122 vs 126 us), so `topk` uses it from MIN_ROWS rows on; splitting a row across programs
(a second launch to merge) is what would make it pay at small batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, require_triton, tl, triton, use_triton


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
    def _topk_kernel(x_ptr, out_ptr, width, s_x, s_o, K: tl.constexpr, BLOCK: tl.constexpr, OBLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + row * s_x
        orow = out_ptr + row * s_o
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256)
        prefix = tl.zeros([], dtype=tl.uint32)  # the threshold key's bytes found so far
        known = tl.zeros([], dtype=tl.uint32)  # which bits of prefix are found
        k_rem = tl.zeros([], dtype=tl.int32) + K  # how many of the keys matching prefix are still wanted
        n_vis = tl.zeros([], dtype=tl.int32)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, width, BLOCK):
                pos = start + offs
                x = tl.load(xrow + pos, mask=pos < width, other=float("-inf"))
                key = _sort_key(x)
                live = (x > float("-inf")) & ((key & known) == prefix)
                digit = ((key >> shift) & 0xFF).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=live)
            if p == 0:
                n_vis = tl.sum(hist)
                k_rem = tl.minimum(k_rem, tl.maximum(n_vis, 1))
            # count of live keys whose byte is >= b, for every b; the byte holding the k_rem-th largest
            ge = tl.sum(hist) - tl.cumsum(hist, 0) + hist
            d = tl.sum((ge >= k_rem).to(tl.int32)) - 1
            k_rem -= tl.sum(tl.where(bins > d, hist, 0))
            prefix = prefix | (d.to(tl.uint32) << shift)
            known = known | (tl.full([], 0xFF, tl.uint32) << shift)
        take_all = (n_vis <= K).to(tl.int32)
        n_sel = tl.minimum(n_vis, K)
        n_above = n_sel - k_rem  # positions strictly above the threshold; then k_rem ties
        done_above = tl.zeros([], dtype=tl.int32)
        done_ties = tl.zeros([], dtype=tl.int32)
        for start in range(0, width, BLOCK):
            pos = start + offs
            x = tl.load(xrow + pos, mask=pos < width, other=float("-inf"))
            key = _sort_key(x)
            vis = x > float("-inf")
            above = vis & (((key > prefix).to(tl.int32) + take_all) > 0)
            tie = vis & ((key == prefix).to(tl.int32) > take_all)
            a = above.to(tl.int32)
            t = tie.to(tl.int32)
            slot_a = done_above + tl.cumsum(a, 0) - 1
            rank_t = done_ties + tl.cumsum(t, 0) - 1
            tl.store(orow + slot_a, pos, mask=above)
            tl.store(orow + n_above + rank_t, pos, mask=tie & (rank_t < k_rem))
            done_above += tl.sum(a)
            done_ties += tl.sum(t)
        for start in range(0, K, OBLOCK):
            o = start + tl.arange(0, OBLOCK)
            tl.store(orow + o, tl.full([OBLOCK], -1, tl.int32), mask=(o >= n_sel) & (o < K))


def topk_triton(logits: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    require_triton()
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be [B, W] fp32, got {tuple(logits.shape)} {logits.dtype}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bsz, width = logits.shape
    out = torch.empty(bsz, k, device=logits.device, dtype=torch.int32)
    if bsz == 0:
        return out
    _topk_kernel[(bsz,)](
        logits,
        out,
        width,
        logits.stride(0),
        out.stride(0),
        K=k,
        BLOCK=block,
        OBLOCK=min(1024, triton.next_power_of_2(k)),
        num_warps=8,
    )
    return out


def topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k largest scores.

    Args:
        logits: [B, W] fp32 scores, -inf at positions a row cannot see.
        k: how many to select per row.
    Returns:
        [B, k] int32 positions in no promised order (module docstring: the kernel's order and ties);
        -1 fills the row when fewer than k positions are visible. No host synchronisation.
    """
    fn = topk_triton if use_triton(logits) and logits.shape[0] >= MIN_ROWS else topk_ref
    return fn(logits, k)


#: rows from which the Triton kernel is used on CUDA (module docstring: measured equal at 64, slower at 1)
MIN_ROWS = 64
