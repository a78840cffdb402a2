"""Cache block allocation: reference counts, prefix hashing, LRU eviction, contiguous runs.

A block is in exactly one of three states:
  free        ref 0, no content worth keeping (in the free bitmap);
  in use      ref >= 1 (held by one or more requests' block tables);
  cached      ref 0 but holding a full block whose prefix hash is registered: reusable by a later
              request with the same prefix, evicted least-recently-freed first when space runs out.

Allocation prefers consecutive block ids (the block after the request's last block, else the
lowest run of the needed length) so a request's blocks export as few contiguous regions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class NoFreeBlocks(RuntimeError):
    pass


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """Key of a full block: digest of the parent block's key and this block's tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, prefix_cache: bool = True) -> None:
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        self.free_mask = np.ones(num_blocks, dtype=bool)
        self.cached: OrderedDict[int, bytes] = OrderedDict()  # ref-0 blocks with a hash, LRU first
        self.hash_to_block: dict[bytes, int] = {}
        self.block_to_hash: dict[int, bytes] = {}

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free + evictable cached)."""
        return int(self.free_mask.sum()) + len(self.cached)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one request."""
        return int((self.ref > 0).sum())

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """n fresh blocks (ref 1), consecutive where possible. Raises NoFreeBlocks."""
        if n <= 0:
            return []
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        ids = self._take_run(n, after)
        if ids is None:  # no run: least recently used cached blocks make room, then the lowest free ids
            while int(self.free_mask.sum()) < n:
                self._evict_one()
            ids = [int(i) for i in np.flatnonzero(self.free_mask)[:n]]
        for b in ids:  # a run may cover cached blocks: their prefixes are forgotten
            if not self.free_mask[b]:
                self._evict(b)
        self.free_mask[ids] = False
        self.ref[ids] = 1
        return ids

    def _take_run(self, n: int, after: int | None) -> list[int] | None:
        """n consecutive ids: right after `after`, else the lowest run of free blocks, else the lowest
        run of free or cached blocks (a request's blocks in one run travel as one region, which is worth
        more than the cached prefixes in the way); None when no run of n exists."""
        fm = self.free_mask
        usable = fm.copy()
        if self.cached:
            usable[np.fromiter(self.cached, dtype=np.int64, count=len(self.cached))] = True
        for mask in (fm, usable):
            if after is not None and after + n < self.num_blocks and mask[after + 1 : after + 1 + n].all():
                return list(range(after + 1, after + 1 + n))
            if n == 1:
                free = np.flatnonzero(mask)
                if free.size:
                    return [int(free[0])]
                continue
            run = np.convolve(mask.astype(np.int32), np.ones(n, dtype=np.int32), mode="valid")
            starts = np.flatnonzero(run == n)
            if starts.size:
                if mask is usable:  # the run that forgets the fewest cached prefixes
                    cached = np.convolve((~fm).astype(np.int32), np.ones(n, dtype=np.int32), mode="valid")
                    starts = starts[cached[starts] == cached[starts].min()]
                s = int(starts[0])
                return list(range(s, s + n))
        return None

    def _evict(self, block: int) -> None:
        h = self.cached.pop(block)
        del self.hash_to_block[h]
        del self.block_to_hash[block]
        self.free_mask[block] = True

    def _evict_one(self) -> None:
        block, h = self.cached.popitem(last=False)
        del self.hash_to_block[h]
        del self.block_to_hash[block]
        self.free_mask[block] = True

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block (in reverse, so a prefix's tail is evicted first)."""
        for b in reversed(blocks):
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.block_to_hash:
                    self.cached[b] = self.block_to_hash[b]
                else:
                    self.free_mask[b] = True

    # ---- prefix cache -----------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes` (no references taken)."""
        out: list[int] = []
        if not self.prefix_cache:
            return out
        for h in hashes:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on cached or in-use blocks found by lookup()."""
        for b in blocks:
            if self.ref[b] == 0:
                self.cached.pop(b, None)
            self.ref[b] += 1

    def register(self, block: int, h: bytes) -> None:
        """Mark an in-use full block as holding the prefix `h` (first writer wins)."""
        if not self.prefix_cache or h in self.hash_to_block or block in self.block_to_hash:
            return
        self.hash_to_block[h] = block
        self.block_to_hash[block] = h

    def clear_cache(self) -> None:
        """Forget every cached prefix (e.g. after the weights change)."""
        while self.cached:
            self._evict_one()
        self.hash_to_block.clear()
        self.block_to_hash.clear()
