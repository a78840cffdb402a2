from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.block_manager import BlockManager, NoFreeBlocks, block_hash


def test_allocation_prefers_consecutive_runs() -> None:
    bm = BlockManager(16)
    a = bm.allocate(4)
    assert a == [0, 1, 2, 3]
    b = bm.allocate(2)
    bm.free(a[1:3])  # hole of 2 at 1..2
    c = bm.allocate(3)
    assert c == [6, 7, 8]  # lowest run of 3, not the hole
    d = bm.allocate(1, after=c[-1])
    assert d == [9]
    bm.free(a[:1] + a[3:] + b + c + d)
    assert bm.num_used == 0 and bm.num_free == 16


def test_refcounts_and_prefix_cache_lru() -> None:
    bm = BlockManager(4)
    blocks = bm.allocate(2)
    h0 = block_hash(None, [1, 2])
    h1 = block_hash(h0, [3, 4])
    bm.register(blocks[0], h0)
    bm.register(blocks[1], h1)
    assert bm.lookup([h0, h1, block_hash(h1, [5])]) == blocks
    bm.acquire(blocks)  # a second request shares them
    bm.free(blocks)
    assert bm.num_used == 2
    bm.free(blocks)
    assert bm.num_used == 0 and bm.num_free == 4 and bm.lookup([h0]) == [blocks[0]]
    bm.allocate(3)  # needs one cached block: the tail (h1) is evicted first
    assert bm.lookup([h0, h1]) == [blocks[0]]
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free([blocks[1], blocks[1]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5)), max_size=40))
def test_random_alloc_free_sequences_keep_the_books(ops) -> None:
    bm = BlockManager(24)
    held: list[list[int]] = []
    for alloc, n in ops:
        if alloc and bm.can_allocate(n):
            got = bm.allocate(n)
            assert len(set(got)) == n
            held.append(got)
        elif held:
            bm.free(held.pop(0))
        owned = [b for h in held for b in h]
        assert len(owned) == len(set(owned)) == bm.num_used
        assert bm.num_used + bm.num_free == 24
    for h in held:
        bm.free(h)
    assert bm.num_used == 0


def test_allocations_stay_runs_through_churn_with_the_prefix_cache() -> None:
    """Whenever n consecutive blocks are free or only cached, an allocation of n is one run (so a
    reservation travels as one region), whatever churn and prefix caching did to the pool; refcounts and
    the cache stay consistent."""
    import random

    rng = random.Random(7)
    bm = BlockManager(512)
    live: list[list[int]] = []
    runs = allocations = 0
    for step in range(3000):
        if live and (rng.random() < 0.45 or bm.num_free < 80):
            blocks = live.pop(rng.randrange(len(live)))
            for i, b in enumerate(blocks):  # full blocks become cached prefixes when freed
                if rng.random() < 0.7:
                    bm.register(b, block_hash(None, [step, i, b]))
            bm.free(blocks)
            continue
        n = rng.randint(1, 40)
        usable = bm.free_mask.copy()
        usable[list(bm.cached)] = True
        possible = any(usable[s : s + n].all() for s in range(512 - n + 1))
        got = bm.allocate(n)
        assert len(set(got)) == n and all(bm.ref[b] == 1 for b in got)
        assert not any(b in bm.block_to_hash for b in got)
        if possible:
            assert got == list(range(got[0], got[0] + n)), (n, got)
        allocations += 1
        runs += got == list(range(got[0], got[0] + n))
        live.append(got)
    assert allocations > 1000 and runs > 0
    for blocks in live:
        bm.free(blocks)
    assert bm.num_used == 0 and bm.num_free == 512
