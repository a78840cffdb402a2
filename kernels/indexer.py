"""Lightning-indexer top-k for decode, over the PAGED indexer key cache.

Cache layout (engine/cache.py, block-major)::

    k_cache  [num_blocks, num_layers, block_size, D]   bf16/fp16/fp32 (exact path)
             or uint8 holding float8_e4m3fn bits     (FP8 path)
    k_scale  [num_blocks, num_layers, block_size]      fp32, one per token (FP8 path; None otherwise)

Row b of a decode batch is one query token at position seq_lens[b] - 1; it sees the keys at
positions 0 .. seq_lens[b] - 1 (its own key already written), which live at
k_cache[block_tables[b, p // block_size], layer, p % block_size]. Several query tokens of one
sequence (MTP verification) are several rows with the same block-table row and increasing seq_lens.

Score (fp32), with every per-head factor folded into `weights` by the caller::

    score(b, p) = sum_h weights[b, h] * relu(q[b, h] . k[p])   (* k_scale[p] on the FP8 path)

- exact path (transformers' form): weights = weights_proj(x) * n_heads^-0.5 * head_dim^-0.5
  (relu(a * c) = c * relu(a) for c > 0, so the model's softmax_scale moves into the weights);
- FP8 path (DeepSeek's): q float8_e4m3fn, weights = weights_proj(x) * n_heads^-0.5 * q_scale *
  head_dim^-0.5 — exactly what model.attention.Indexer.queries returns.

The Triton version computes the logits in one fused kernel (tensor-core dots: bf16 x bf16 on the exact
path, e4m3 x e4m3 with fp32 accumulation on the FP8 path) and selects the top-k by radix select
(kernels/radix_topk.py: the split kernel up to 32 rows, the stream kernel beyond): the logits kernel, then one
(stream) or six (split: a memset, four histogram passes, the write) launches per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, interpreting, pdl, pdl_start, require_triton, tl, triton, use_triton
from .radix_topk import topk as topk_rows
from .radix_topk import topk_ref

FP8_DTYPE = torch.float8_e4m3fn
TOPK_KERNEL = True  # False: torch.topk after the logits kernel (bench/engine.py --glue unfused, for comparison)


def _check(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or weights.shape != q.shape[:2]:
        raise ValueError(f"q must be [B, H, D] and weights [B, H]; got {tuple(q.shape)} and {tuple(weights.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k_cache must be [num_blocks, num_layers, block_size, {q.shape[-1]}], got {tuple(k_cache.shape)}"
        )
    fp8 = k_cache.dtype == torch.uint8
    if fp8 != (k_scale is not None):
        raise ValueError("an FP8 (uint8) key cache needs k_scale, an exact one must not have it")
    if fp8 and q.dtype != FP8_DTYPE:
        raise ValueError(f"the FP8 path takes float8_e4m3fn queries, got {q.dtype}")
    if block_tables.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError("block_tables [B, max_blocks] and seq_lens [B] must match q's batch")


def _width(block_tables: torch.Tensor, block_size: int, max_seq_len: int | None) -> int:
    return int(max_seq_len) if max_seq_len is not None else block_tables.shape[1] * block_size


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def indexer_logits_decode_ref(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Index scores [B, W] fp32, -inf at positions >= seq_lens[b]; W = max_seq_len or
    max_blocks * block_size. Arguments as in indexer_topk_decode."""
    _check(q, weights, k_cache, k_scale, block_tables, seq_lens)
    bsz, bs = q.shape[0], k_cache.shape[2]
    width = _width(block_tables, bs, max_seq_len)
    pos = torch.arange(width, device=q.device)
    page = (pos // bs).clamp(max=block_tables.shape[1] - 1)
    blk = block_tables[:, page].long().clamp(0, k_cache.shape[0] - 1)  # [B, W]
    off = (pos % bs)[None, :].expand(bsz, width)
    keys = k_cache[blk, layer, off]  # [B, W, D]
    if k_scale is not None:
        keys = keys.view(FP8_DTYPE)
    logits = F.relu(torch.einsum("bhd,bwd->bhw", q.float(), keys.float()))
    scores = torch.einsum("bh,bhw->bw", weights.float(), logits)
    if k_scale is not None:
        scores = scores * k_scale[blk, layer, off]
    valid = pos[None, :] < seq_lens[:, None].long()
    return scores.masked_fill(~valid, float("-inf"))


def indexer_topk_decode_ref(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    logits = indexer_logits_decode_ref(q, weights, k_cache, k_scale, layer, block_tables, seq_lens, max_seq_len)
    return topk_ref(logits, topk)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _indexer_logits_kernel(
        q_ptr,
        w_ptr,
        k_ptr,
        ks_ptr,
        bt_ptr,
        sl_ptr,
        out_ptr,
        layer,
        max_blocks,
        width,
        pages,
        s_qb,
        s_qh,
        s_wb,
        s_k0,
        s_k1,
        s_k2,
        s_s0,
        s_s1,
        s_bt,
        s_ob,
        H: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        FP8: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        b = tl.program_id(0)
        p0 = tl.program_id(1) * pages
        seq_len = tl.load(sl_ptr + b)
        offs_h = tl.arange(0, H)
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, BS)
        q = tl.load(q_ptr + b * s_qb + offs_h[:, None] * s_qh + offs_d[None, :])
        if FP8:  # e4m3 straight into the tensor cores (fp32 accumulation), as DeepSeek's fp8_index
            q = q.to(tl.float8e4nv, bitcast=True)
        if UPCAST:
            q = q.to(tl.float32)
        w = tl.load(w_ptr + b * s_wb + offs_h).to(tl.float32)
        n_valid = tl.cdiv(seq_len, BS)
        p_end = tl.minimum(tl.minimum(p0 + pages, n_valid), max_blocks)
        for page in range(p0, p_end):
            blk = tl.load(bt_ptr + b * s_bt + page).to(tl.int64)
            pos = page * BS + offs_t
            valid = pos < seq_len
            base = blk * s_k0 + layer * s_k1
            k = tl.load(k_ptr + base + offs_t[:, None] * s_k2 + offs_d[None, :], mask=valid[:, None], other=0)
            if FP8:
                k = k.to(tl.float8e4nv, bitcast=True)
            if UPCAST:
                k = k.to(tl.float32)
            # tokens x heads: the head reduction runs along the accumulator's rows (within a warp)
            if IEEE:
                s = tl.dot(k, tl.trans(q), input_precision="ieee")
            else:
                s = tl.dot(k, tl.trans(q))
            s = tl.maximum(s, 0.0) * w[None, :]
            score = tl.sum(s, axis=1)
            if FP8:
                score = score * tl.load(ks_ptr + blk * s_s0 + layer * s_s1 + offs_t, mask=valid, other=0.0)
            score = tl.where(valid, score, float("-inf"))
            tl.store(out_ptr + b * s_ob + pos, score, mask=pos < width)
        for page in range(tl.maximum(p_end, p0), tl.minimum(p0 + pages, max_blocks)):
            pos = page * BS + offs_t
            tl.store(out_ptr + b * s_ob + pos, tl.full([BS], float("-inf"), tl.float32), mask=pos < width)


def _pages_per_program(bsz: int, max_blocks: int) -> int:
    # enough programs to fill ~132 SMs several times over, but amortise the q load over pages
    pages = 1
    while pages < 8 and bsz * max_blocks // (pages * 2) >= 4 * 132:
        pages *= 2
    return pages


def indexer_logits_decode_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
    pages_per_program: int | None = None,
) -> torch.Tensor:
    require_triton()
    _check(q, weights, k_cache, k_scale, block_tables, seq_lens)
    bsz, heads, dim = q.shape
    bs = k_cache.shape[2]
    if heads & (heads - 1) or dim & (dim - 1) or bs & (bs - 1) or min(heads, dim, bs) < 16:
        raise ValueError(f"heads {heads}, head dim {dim} and block size {bs} must be powers of two >= 16")
    if k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("k_cache and q need a contiguous last dimension")
    width = _width(block_tables, bs, max_seq_len)
    max_blocks = min(block_tables.shape[1], -(-width // bs))
    out = torch.empty(bsz, width, device=q.device, dtype=torch.float32)
    fp8 = k_scale is not None
    qv = q.view(torch.uint8) if fp8 else q
    ks = k_scale if k_scale is not None else out  # dummy pointer when unused
    pages = pages_per_program or _pages_per_program(bsz, max_blocks)
    kern = _indexer_logits_kernel
    grid = (bsz, triton.cdiv(max_blocks, pages))
    kern[grid](
        qv,
        weights,
        k_cache,
        ks,
        block_tables,
        seq_lens,
        out,
        layer,
        max_blocks,
        width,
        pages,
        qv.stride(0),
        qv.stride(1),
        weights.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        ks.stride(0) if fp8 else 0,
        ks.stride(1) if fp8 else 0,
        block_tables.stride(0),
        out.stride(0),
        H=heads,
        D=dim,
        BS=bs,
        FP8=fp8,
        UPCAST=interpreting(kern),
        IEEE=(not fp8 and q.dtype == torch.float32),
        num_warps=4,
        num_stages=3,
        **pdl(kern, qv),
    )
    return out


def indexer_topk_decode_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    logits = indexer_logits_decode_triton(q, weights, k_cache, k_scale, layer, block_tables, seq_lens, max_seq_len)
    return topk_rows(logits, topk) if TOPK_KERNEL else topk_ref(logits, topk)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def _triton_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    heads, dim, bs = q.shape[1], q.shape[2], k_cache.shape[2]
    return use_triton(q) and not (heads & (heads - 1) or dim & (dim - 1) or bs & (bs - 1) or min(heads, dim, bs) < 16)


def indexer_logits_decode(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Index scores of a decode batch over the paged key cache.

    Args:
        q: [B, H, D] query per head — bf16/fp16/fp32 (exact path) or float8_e4m3fn (FP8 path).
        weights: [B, H] fp32 per-head weights with every scale folded in (see module docstring).
        k_cache: [num_blocks, num_layers, block_size, D] keys, q's dtype or uint8 (e4m3 bits).
        k_scale: [num_blocks, num_layers, block_size] fp32 per-token key scales (FP8 path) or None.
        layer: which layer's slice of the pools.
        block_tables: [B, max_blocks] int32 physical block ids.
        seq_lens: [B] int32 visible keys per row (>= 1).
        max_seq_len: width W of the result (default max_blocks * block_size).
    Returns:
        [B, W] fp32 scores, -inf at positions >= seq_lens[b].
    The Triton kernel serves CUDA tensors whose heads, head dim and block size are powers of two
    >= 16; other shapes (small test presets) run the reference.
    """
    fn = indexer_logits_decode_triton if _triton_fits(q, k_cache) else indexer_logits_decode_ref
    return fn(q, weights, k_cache, k_scale, layer, block_tables, seq_lens, max_seq_len)


def indexer_topk_decode(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The lightning indexer's top-k for a decode batch (arguments as in indexer_logits_decode).

    Returns:
        [B, topk] int32 positions (0 .. seq_lens[b] - 1) of the selected keys, in no particular
        order; -1 fills the row when fewer than topk keys are visible (then every visible key
        is selected). Feed it straight to sparse_mla_decode. No host synchronisation (graph-safe).
    When the width (max_seq_len, or the block tables' span) is at most topk, every visible key is
    selected whatever its score: positions 0 .. seq_lens[b] - 1 in order, without scoring.
    """
    if _width(block_tables, k_cache.shape[2], max_seq_len) <= topk:
        pos = torch.arange(topk, device=seq_lens.device, dtype=torch.int32)[None, :]
        return torch.where(pos < seq_lens[:, None], pos, -1)
    fn = indexer_topk_decode_triton if _triton_fits(q, k_cache) else indexer_topk_decode_ref
    return fn(q, weights, k_cache, k_scale, layer, block_tables, seq_lens, topk, max_seq_len)
