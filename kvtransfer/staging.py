"""Staging: a request's scattered blocks travel as one region.

Transfer engines charge per descriptor (~8-11 us each over NIXL/UCX, see base.py): a request whose
blocks are scattered in the sender's pool (prefix-cache hits, a pool after churn) moves at 11-13 GB/s
where one region of the same bytes moves at 200+ GB/s. The sender therefore gathers such blocks into
a contiguous *staging area* at the end of its own pools (blocks [start, start + count) of every pool,
never handed out by the engine's allocator), in the order of the destination's block ids, and posts
ONE write per run of consecutive destination blocks. The decode side's reservations are allocated as
runs (engine/block_manager.py), so a request's write is one descriptor per pool.

Floors, per request of B bytes: the transfer itself B / link rate (H200 cuda_ipc on one GPU: 231 GB/s
for one region); the gather reads and writes B in HBM: 2B / 4.3 TB/s, ~5% of the transfer time. So
staged scattered blocks can reach ~95% of one region; unstaged they are at ~5%.

`copy_blocks(pools, src, dst)` copies whole blocks inside each pool: on CUDA one Triton launch for
all pools (rows of 8-byte words, no temporaries; the pools are addressed from the first one's
pointer), `pool[dst] = pool[src]` elsewhere (the reference).
`StagingArea` hands out contiguous runs of the staging blocks (first fit) and takes them back when the
write is done.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from splitserve.kernels._common import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _copy_rows_kernel(ref, pool_offs, pool_rows, src_idx, dst_idx, BLOCK: tl.constexpr, VEC: tl.constexpr):
        """Block src[r] -> dst[r] of pool p, words [c * BLOCK, (c + 1) * BLOCK): pool p starts
        pool_offs[p] words after `ref` and its blocks are pool_rows[p] words long; every start and
        length is a multiple of VEC words (so the accesses can be 16-byte vectors)."""
        r = tl.program_id(0)
        c = tl.program_id(1)
        p = tl.program_id(2)
        row_words = tl.multiple_of(tl.load(pool_rows + p), VEC)
        base = ref + tl.multiple_of(tl.load(pool_offs + p), VEC)
        s = tl.load(src_idx + r).to(tl.int64)
        d = tl.load(dst_idx + r).to(tl.int64)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        m = offs < row_words
        src = tl.multiple_of(s * row_words, VEC)
        dst = tl.multiple_of(d * row_words, VEC)
        v = tl.load(base + src + offs, mask=m)
        tl.store(base + dst + offs, v, mask=m)


def _words(pool: torch.Tensor) -> torch.Tensor:
    """The pool as [num_blocks, words] of the widest integer type dividing a block's bytes."""
    flat = pool.view(pool.shape[0], -1).view(torch.uint8)
    nbytes = flat.shape[1]
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if nbytes % size == 0:
            return flat.view(dt)
    return flat


def copy_blocks_ref(pools: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    for p in pools:  # as rows of machine words: the copy is a plain memory copy whatever the dtype
        w = _words(p)
        w.index_copy_(0, dst, w.index_select(0, src))


def copy_blocks_triton(
    pools: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor, block_words: int = 2048
) -> None:
    """Copy block src[i] to block dst[i] in every pool (src and dst disjoint): one launch for all the
    pools whose blocks are rows of the same word type (normally all of them)."""
    n = int(src.numel())
    if n == 0:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in pools:
        w = _words(p)
        groups.setdefault(w.dtype, []).append(w)
    for words in groups.values():
        ref = words[0]
        item = ref.element_size()
        gaps = [w.data_ptr() - ref.data_ptr() for w in words]
        if any(g % item for g in gaps):  # never seen (allocations are 512-byte aligned); the kernel needs it
            raise ValueError("pools whose starts are not a whole number of words apart")
        starts = tuple(g // item for g in gaps)
        lengths = tuple(w.shape[1] for w in words)
        offs, rows = _pool_table(starts, lengths, ref.device)
        vec = math.gcd(max(16 // item, 1), *starts, *lengths)  # words per 16-byte vector, where aligned
        grid = (n, triton.cdiv(max(lengths), block_words), len(words))
        _copy_rows_kernel[grid](ref, offs, rows, src, dst, BLOCK=block_words, VEC=vec)


@functools.lru_cache(maxsize=16)
def _pool_table(
    offs: tuple[int, ...], rows: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pool's start (in words from the first pool's) and block length, on the device; kept, as
    a transport's pools never move."""
    return (
        torch.tensor(offs, dtype=torch.int64, device=device),
        torch.tensor(rows, dtype=torch.int64, device=device),
    )


def copy_blocks(
    pools: Sequence[torch.Tensor],
    src: Sequence[int] | np.ndarray | torch.Tensor,
    dst: Sequence[int] | np.ndarray | torch.Tensor,
) -> None:
    """Copy whole blocks src[i] -> dst[i] in every pool (the two sets disjoint), on the pools' device
    and the current stream (so after the engine step that wrote them)."""
    if not pools:
        return
    dev = pools[0].device
    src_a, dst_a = np.asarray(src, dtype=np.int64).ravel(), np.asarray(dst, dtype=np.int64).ravel()
    if src_a.size != dst_a.size:
        raise ValueError(f"{src_a.size} source blocks for {dst_a.size} destinations")
    idx = torch.from_numpy(np.stack([src_a, dst_a])).to(dev, non_blocking=True)  # one host -> device copy
    s, d = idx[0], idx[1]
    if HAS_TRITON and dev.type == "cuda":
        copy_blocks_triton(pools, s, d)
    else:
        copy_blocks_ref(pools, s, d)


class StagingArea:
    """Contiguous runs of blocks [start, start + count) of the registered pools, first fit. Thread-safe."""

    def __init__(self, start: int, count: int) -> None:
        if start < 0 or count < 0:
            raise ValueError("staging start and count must be >= 0")
        self.start, self.count = start, count
        self._free = np.ones(count, dtype=bool)
        self._lock = threading.Lock()
        self.staged_writes = 0  # writes that went through the staging area
        self.unstaged_writes = 0  # scattered writes that found no room (posted block by block)

    @property
    def num_free(self) -> int:
        with self._lock:
            return int(self._free.sum())

    def take(self, n: int) -> int | None:
        """The first block id of n consecutive free staging blocks (now taken), or None."""
        if n <= 0 or n > self.count:
            return None
        with self._lock:
            # free blocks in each window of n, by prefix sums: O(count), where a convolution was O(count x n)
            # (~1 ms for a 2048-block area, on every staged write)
            c = np.concatenate(([0], np.cumsum(self._free, dtype=np.int64)))
            starts = np.flatnonzero(c[n:] - c[:-n] == n)
            if not starts.size:
                return None
            s = int(starts[0])
            self._free[s : s + n] = False
            return self.start + s

    def give_back(self, first: int, n: int) -> None:
        with self._lock:
            i = first - self.start
            if i < 0 or i + n > self.count or self._free[i : i + n].any():
                raise RuntimeError(f"staging blocks [{first}, {first + n}) were not taken")
            self._free[i : i + n] = True
